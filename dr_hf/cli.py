"""The ``dr-hf`` command line: ``reinforce``, ``verify``, ``demo``."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Dict, List, Optional

from .pipeline import PRESET_HELP, PRESETS
from .errors import network_errors, said, with_flags
from .teacher import COMPILE_MODES, TORCH_COMPILE_MODES


def cmd_reinforce(args) -> int:
    from .pipeline import make_pipeline
    from .format import ReinforceConfig, public_source
    from .images import image_column_of
    from .processes import current_processes, finish
    from .job import default_render, reinforce
    from .streams import stream_length
    from .reinforcer import check_preparation
    from .shards import check_split_name, shard_paths
    from .source import check_outside_source, load_source
    from .stats import agreement_text
    from .teacher import TeacherEnsemble

    check_split_name(args.split)
    check_preparation(args.prepare_workers, args.prepare_threads)
    if args.num_rows is not None and not args.streaming:
        raise ValueError("--num-rows gives a --streaming source's length; a source read whole has its own")
    procs = current_processes(args.device)
    if not args.quiet:
        logging.basicConfig(format="%(asctime)s %(message)s", level=logging.WARNING)  # the job's lines name the process
        logging.getLogger("dr_hf").setLevel(logging.INFO)
    make_pipeline(args.augment, crop_scale=args.crop_scale, group_size=args.group_size)  # its options, before loading
    shuffle_seed = args.seed if args.shuffle else None
    check_outside_source(args.output, args.dataset)  # (before loading: load_dataset would read the output's shards)
    ds = load_source(args.dataset, args.split, args.name, args.revision, None if args.streaming else args.limit,
                     streaming=args.streaming, shuffle_seed=shuffle_seed)
    args.image_column = args.image_column or image_column_of(ds)
    if args.streaming:
        num_rows = args.num_rows or stream_length(ds, args.split, args.label_column or args.image_column)
        if args.limit:
            ds, num_rows = ds.take(args.limit), min(args.limit, num_rows)
    else:
        num_rows = len(ds)
    teachers = TeacherEnsemble.from_specs(args.teacher, device=procs.device, precision=args.precision,
                                          compile_mode=args.compile)
    render_device, render = default_render(teachers, args.render_device, args.render)
    config = ReinforceConfig.for_teachers(
        teachers, args.augment, num_samples=args.num_samples, topk=args.topk, seed=args.seed,
        crop_scale=args.crop_scale, group_size=args.group_size, teacher_batch_size=args.teacher_batch_size,
        render=render, image_column=args.image_column, label_column=args.label_column or None,
        source={**public_source(args.dataset, args.revision), "name": args.name, "split": args.split,
                "limit": args.limit, "num_rows": num_rows,  # a local folder by its name only
                **({"shuffle_seed": shuffle_seed} if args.shuffle else {})},
        rows_per_shard=args.rows_per_shard, keep_source=not args.no_images,
    )
    command = public_command(sys.argv[1:], {args.dataset: config.source["path"],
                                            args.output: os.path.basename(os.path.normpath(args.output))})
    try:
        result = reinforce(ds, config, teachers, args.output, split=args.split, batch_size=args.batch_size,
                           show_progress=not args.quiet, command=command, num_rows=num_rows, processes=procs,
                           render_threads=args.render_threads, on_bad_row=args.on_bad_row, wait=args.wait,
                           render_device=render_device, prepare_workers=args.prepare_workers,
                           prepare_threads=args.prepare_threads)
    finally:
        finish()
    if not procs.is_main:
        return 0
    s = result.stats
    who = f" by this process of {result.world}" if result.world > 1 else ""
    print(f"wrote {result.output_dir}: {s['rows']} rows x {s['num_samples']} samples, top-{s['topk']} in "
          f"{len(shard_paths(result.output_dir, args.split))} shard(s) ({result.shards_written} written{who}, "
          f"{result.shards_skipped} already complete)")
    print(f"storage: {s['bytes_per_sample']} bytes per augmentation sample "
          f"(params {s['bytes_per_sample_params']}, top-K {s['bytes_per_sample_topk']})")
    if s.get("skipped_rows"):
        print(f"skipped {s['skipped_rows']} bad row(s) of {s['source_rows']}: listed with the reasons in {args.output}/errors/")
    if "teacher_top1_agreement" in s:
        print("teacher top-1 agreement with labels: "
              + agreement_text(s["teacher_top1_agreement"], config.num_classes, s["rows"], s["agreement_samples"]))
    if "images_per_second" in s:
        print(f"throughput: {s['images_per_second']} images/s, {s['samples_per_second']} samples/s")
    return 0


def public_command(argv: List[str], rename: dict) -> Optional[str]:
    """The ``dr-hf reinforce`` command line as the card shows it: local paths replaced by their public names."""
    if argv[:1] != ["reinforce"]:
        return None
    return "dr-hf " + " ".join(shlex.quote(rename.get(a, a)) for a in argv)


def cmd_verify(args) -> int:
    from .stats import agreement_text
    from .verify import verify

    report = verify(args.path, teachers=args.teacher, rows=args.rows, split=args.split, seed=args.seed,
                    atol=args.atol, rtol=args.rtol, device=args.device, source=args.source, revision=args.revision)
    print(f"schema: {report.rows} rows checked" + ("" if not report.problems else f", {len(report.problems)} problem(s)"))
    if report.replayed_rows:
        print(f"replayed {report.replayed_rows} row(s): largest |log-prob difference| = {report.max_abs_diff:.3g}, "
              f"parameter mismatches = {report.params_mismatches}, samples whose top-K order changed = {report.topk_index_mismatches}")
        if not report.params_redrawn:
            print("parameters not re-drawn: this data was drawn by dr-hf 0.1's per-sample sampler (format 2); "
                  "its stored parameters were replayed")
    if report.agreement is not None:
        print(f"teacher top-1 agreement with labels: {agreement_text(report.agreement, report.num_classes, report.rows)}")
    for problem in report.problems:
        print(f"FAIL: {problem}")
    print("OK" if report.ok else "FAILED")
    return 0 if report.ok else 1


def cmd_push(args) -> int:
    from .hub import push

    if not args.quiet:
        logging.basicConfig(format="%(message)s", level=logging.WARNING)
        logging.getLogger("dr_hf").setLevel(logging.INFO)
    result = push(args.folder, args.repo_id, private=True if args.private else None, revision=args.revision,
                  token=args.token, files_per_commit=args.files_per_commit)
    print(f"pushed {args.folder} to {result.url} ({result.revision}): {len(result.uploaded)} file(s) in "
          f"{result.commits} commit(s), {len(result.skipped)} already there"
          + (f", merged from pull request #{result.pull_request}" if result.pull_request else "")
          + (f", {len(result.removed)} file(s) of an earlier push removed" if result.removed else ""))
    at = f', revision="{args.revision}"' if args.revision else ""
    print(f'load it with: datasets.load_dataset("{args.repo_id}"{at}, split="train")  (or streaming=True)')
    return 0


def cmd_preview(args) -> int:
    from .preview import render_preview

    path = render_preview(args.folder, out=args.out, rows=args.rows, samples=args.samples, split=args.split,
                          source=args.source, seed=args.seed, revision=args.revision)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, teacher=args.teacher)
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says it or there is none to say (a required
    option, an unset one, an off flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.required or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


# library parameters whose flags have other names (``--output`` is ``reinforce(output_dir=...)``)
FLAG_OF_PARAMETER = {"output_dir": "--output", "teachers": "--teacher", "preset": "--augment",
                     "compile_mode": "--compile", "keep_source": "--no-images",
                     "shuffle_seed": "--shuffle"}


def flags_of(parser: argparse.ArgumentParser) -> Dict[str, str]:
    """Parameter name -> flag for a command's options: its own (``num_samples`` -> ``--num-samples``) and the
    library's other names for them (:data:`FLAG_OF_PARAMETER`)."""
    flags = {a.dest: max(a.option_strings, key=len) for a in parser._actions if a.option_strings}
    return {**flags, **{p: f for p, f in FLAG_OF_PARAMETER.items() if f in flags.values()}}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dr-hf", description="Dataset Reinforcement for Hugging Face datasets")
    sub = parser.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reinforce", formatter_class=HelpFormatter,
                       help="add augmentation-parameter and sparse teacher-output columns to an image dataset")
    r.add_argument("dataset", help="anything datasets.load_dataset accepts: Hub id, local folder, image folder")
    r.add_argument("--output", required=True, help="output folder (Hub layout: README.md + data/*.parquet)")
    r.add_argument("--teacher", action="append", required=True,
                   help="teacher spec; repeat for an ensemble (efficientnet-lite0, timm:NAME[@FILE], hf:REPO_OR_DIR)")
    source = r.add_argument_group("the source")
    recorded = r.add_argument_group("the reinforcement",
                                    "recorded in the data: a rerun into the folder must give the same")
    running = r.add_argument_group("running the job")
    recorded.add_argument("--augment", default="imagenet+rrc", choices=sorted(PRESETS), metavar="PRESET",
                          help="augmentation preset: " + "; ".join(f"{k}: {v}" for k, v in PRESET_HELP.items()))
    recorded.add_argument("--crop-scale", type=float, default=None,
                          help="RandomResizedCrop's smallest area fraction (default 0.08; ~0.35 for 32x32 images)")
    recorded.add_argument("--num-samples", type=int, default=400, help="augmentations per image (N; paper: 400)")
    recorded.add_argument("--topk", type=int, default=None,
                          help="teacher classes kept per sample (K; default and paper: 10, or all of a teacher's fewer "
                               "classes)")
    recorded.add_argument("--seed", type=int, default=0,
                          help="the reinforcement is a pure function of (seed, row, sample index)")
    running.add_argument("--batch-size", type=int, default=None,
                         help="images per map batch, rounded up to whole teacher blocks (default: 65,536 samples' "
                              "worth, 256 to 1024 rows; does not change the output; the teacher's work drains between "
                              "map batches, so larger ones keep a GPU busier)")
    recorded.add_argument("--teacher-batch-size", type=int, default=None,
                          help="samples per teacher forward (default 256 on a GPU, 64 on a CPU): all N samples of as "
                               "many rows as fit (a power of two), or chunks of one row's (or MixUp/CutMix group's) "
                               "samples")
    recorded.add_argument("--rows-per-shard", type=int, default=2048,
                          help="rows per parquet shard (the unit of resume)")
    recorded.add_argument("--group-size", type=int, default=None,
                          help="rows per MixUp/CutMix partner group (default 8)")
    source.add_argument("--split", default="train", help="the source split (also the output split's name)")
    source.add_argument("--name", default=None, help="dataset config name")
    source.add_argument("--revision", default=None, help="the source's Hub revision (branch, tag or commit)")
    source.add_argument("--image-column", default=None,
                        help="the source's image column (default: its one column of type datasets.Image, else image)")
    source.add_argument("--label-column", default="label", help="'' for unlabelled data")
    source.add_argument("--limit", type=int, default=None,
                        help="only the first M rows, for trials (with --shuffle, a random M: the first rows of a "
                             "source sorted by label are one class)")
    source.add_argument("--shuffle", action="store_true",
                        help="reinforce the rows in a random order, datasets' shuffle(seed=--seed) (recorded): "
                             "MixUp/CutMix partners are rows stored together, and a source sorted by label is refused "
                             "without it")
    source.add_argument("--streaming", action="store_true",
                        help="stream the source (sets that do not fit on disk); dr_index = position in the stream")
    source.add_argument("--num-rows", type=int, default=None,
                        help="the stream's length, when its metadata lacks it (else from its parquet footers, or "
                             "counted)")
    recorded.add_argument("--no-images", action="store_true",
                          help="write only the dr_* columns (with each row's image fingerprint): a reinforcement-only "
                               "dataset for sources that may not be redistributed; join it back with dr_hf.join_source")
    running.add_argument("--on-bad-row", default="fail", choices=["fail", "skip"],
                         help="an undecodable image or out-of-range label: stop naming it (fail), or leave the row out "
                              "and list it in OUTPUT/errors/*.jsonl and the card (skip)")
    running.add_argument("--render-threads", type=int, default=None,
                         help="threads rendering teacher inputs ahead of the teacher (default: on a GPU 2 with "
                              "RandAugment, else 1; 0 on the CPU, where they would compete for cores); the output is "
                              "the same for any number")
    running.add_argument("--prepare-threads", type=int, default=None,
                         help="threads that decode rows and draw their parameters ahead of the teacher (default: 4 "
                              "with teachers on a GPU, which would otherwise wait for them, 0 on the CPU); the output "
                              "is the same for any number")
    running.add_argument("--prepare-workers", type=int, default=0,
                         help="processes instead of threads for that (default 0); for decoders that hold the GIL")
    running.add_argument("--render-device", default=None,
                         help="where teacher inputs are rendered (default: the teachers' device): cpu, or cuda (each "
                              "image moved to the GPU once)")
    recorded.add_argument("--render", default=None, choices=["per-sample", "batched"],
                          help="how: per-sample crops (torch's kernel per sample), or batched (each image's samples at "
                               "once by two matrix products; within 1 grey level of per-sample for bilinear "
                               "RandomResizedCrop+flip, about 0.2 on average for every preset). Default: batched when "
                               "rendering on a GPU, else per-sample. Recorded; verify renders the same way")
    running.add_argument("--wait", action="store_true",
                         help="if another job holds --output, wait for it instead of stopping (one job per folder)")
    running.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    recorded.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                          help="teacher precision: fp32 (faithful to ml-dr), tf32 or bf16 autocast (faster on GPUs; "
                               "python scripts/bench_precision.py measures what it changes)")
    running.add_argument("--compile", default=None, choices=list(COMPILE_MODES), metavar="MODE",
                         help="torch.compile the teachers with this mode (" + ", ".join(TORCH_COMPILE_MODES) + "; "
                              "reduce-overhead replays each forward as one CUDA graph; use it on GPUs: it made the "
                              "job 1.5-1.65x as fast on an H100; changes only float rounding; compiling takes tens of "
                              "seconds when the job starts, python scripts/bench_compile.py measures both), or trace: "
                              "a TorchScript trace, eager's kernels bit for bit, launched without the GIL beside the "
                              "job's threads, no compiler")
    running.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    r.set_defaults(func=cmd_reinforce)

    v = sub.add_parser("verify", formatter_class=HelpFormatter,
                       help="check a reinforced dataset's values and replay rows through its recorded teachers")
    v.add_argument("path", help="a reinforced folder or Hub dataset id (downloaded to the Hugging Face cache first)")
    v.add_argument("--revision", default=None, help="the Hub dataset's revision (branch, tag or commit)")
    v.add_argument("--teacher", action="append", default=None,
                   help="optional: must match the recorded teachers (verify replays those by default)")
    v.add_argument("--rows", type=int, default=8, help="rows to replay through the recorded teachers (0: schema and values only)")
    v.add_argument("--split", default="train", help="the split whose shards are checked")
    v.add_argument("--seed", type=int, default=0, help="picks the replayed rows")
    v.add_argument("--atol", type=float, default=1e-3, help="absolute log-prob tolerance")
    v.add_argument("--rtol", type=float, default=2e-3, help="relative log-prob tolerance (covers one float16 step)")
    v.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    v.add_argument("--source", default=None,
                   help="the base dataset, to replay a reinforcement-only (--no-images) folder's rows")
    v.set_defaults(func=cmd_verify)

    p = sub.add_parser("push", formatter_class=HelpFormatter,
                       help="upload a reinforced folder to a Hub dataset repo (resumable; main changes in one step)")
    p.add_argument("folder", help="a reinforced folder (dr-hf reinforce --output)")
    p.add_argument("repo_id", help="org/name, e.g. org/imagenet-plus")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`); never printed")
    p.add_argument("--files-per-commit", type=int, default=50,
                   help="files per Hub commit (shards first, card last; several commits to main go to a pull request, "
                        "merged at once)")
    p.add_argument("--quiet", action="store_true", help="no log lines")
    p.set_defaults(func=cmd_push)

    pv = sub.add_parser("preview", formatter_class=HelpFormatter,
                        help="render a grid of replayed samples with the teacher's top classes (PNG)")
    pv.add_argument("folder", help="a reinforced folder (dr-hf reinforce --output) or a Hub dataset id (its card and "
                                   "the split's first shard are downloaded)")
    pv.add_argument("--output", "--out", dest="out", default=None, metavar="FILE",
                    help="the image file (default: FOLDER/preview.png; preview.png here for a Hub dataset)")
    pv.add_argument("--revision", default=None, help="the Hub dataset's revision (branch, tag or commit)")
    pv.add_argument("--rows", type=int, default=4, help="rows shown (grid rows)")
    pv.add_argument("--samples", type=int, default=4, help="stored samples shown per row (grid columns)")
    pv.add_argument("--split", default="train", help="the split to show")
    pv.add_argument("--source", default=None, help="the source dataset, for a reinforcement-only (--no-images) folder")
    pv.add_argument("--seed", type=int, default=0, help="picks which rows and samples are shown")
    pv.set_defaults(func=cmd_preview)

    d = sub.add_parser("demo", formatter_class=HelpFormatter,
                       help="reinforce an embedded set of photos end to end, load it back and verify it")
    d.add_argument("--output", default="out/demo-plus", help="the reinforced folder (the source goes to OUTPUT-source)")
    d.add_argument("--teacher", default="efficientnet-lite0", help="teacher spec")
    d.set_defaults(func=cmd_demo)
    for command in sub.choices.values():
        command.set_defaults(flags=flags_of(command))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, RuntimeError, ArithmeticError) as exc:  # named by flags, not parameters
        print(f"dr-hf {args.command}: error: {with_flags(str(exc), args.flags)}", file=sys.stderr)
        return 2
    except network_errors() as exc:  # (the Hub's HTTP client's, not OSErrors)
        from huggingface_hub import constants

        print(f"dr-hf {args.command}: error: cannot reach the Hub at {constants.ENDPOINT} ({said(exc)}): rerun once "
              "it can be reached (a push resumes where it stopped), or set HF_HUB_OFFLINE=1 to read only what is "
              "cached", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
