"""Shared by the scripts: write a results page (Markdown lines) and echo it."""

import os


def write_markdown(path, lines):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def host():
    """This machine's CPU as a results page names it: its model and core count (per-core rates differ between CPUs;
    ratios measured side by side in one run do not)."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        import platform

        model = platform.processor() or model
    return f"{model}, {os.cpu_count()} cores"
