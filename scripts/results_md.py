"""Shared by the scripts: write a results page (Markdown lines) and echo it."""

import os


def write_markdown(path, lines):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
