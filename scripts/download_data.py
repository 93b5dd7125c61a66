"""Download the full MiniMind training data into dataset/ (the bundled dataset/demo/ is tiny).

    python scripts/download_data.py --list                                   # known files, sizes, stages
    python scripts/download_data.py pretrain_hq.jsonl sft_mini_512.jsonl      # from Hugging Face
    python scripts/download_data.py pretrain_t2t_mini.jsonl sft_t2t_mini.jsonl  # minimind-3's files
    python scripts/download_data.py dpo.jsonl --source modelscope             # from ModelScope
    python scripts/download_data.py sft_512.jsonl --endpoint https://MIRROR   # through a Hugging Face mirror
    python scripts/download_data.py pretrain_hq.jsonl --force                 # download again

Files come from the Hugging Face dataset repo jingyaogong/minimind_dataset or the ModelScope dataset
gongjy/minimind_dataset, through each hub's own client library, which shows progress; run the same
command again after an interruption and the Hugging Face client resumes the partial file (as do recent
ModelScope clients). ModelScope needs `pip install modelscope`; HF_ENDPOINT works like --endpoint.
A file already in the output folder (non-empty) is skipped unless --force is given.
The hubs now hold minimind-3's files; MiniMind2's names stay listed for copies and mirrors that still have them.
dpo.jsonl is one name for both generations: the hub's file is minimind-3's (53 MB; MiniMind2's was 909 MB).
Exit status: 0 if every file is present afterwards, 1 if any download failed, 2 for bad arguments.
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the repository root: the import root
    sys.path.insert(0, REPO_ROOT)
from dataset.files import FILES, HF_REPO, MS_REPO  # noqa: E402

SOURCES = ("huggingface", "modelscope")
DEFAULT_OUT_DIR = os.path.join(REPO_ROOT, "dataset")


def fetch_huggingface(name, out_dir, force=False, endpoint=None):
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=name, local_dir=out_dir,
                           force_download=force, endpoint=endpoint)


def fetch_modelscope(name, out_dir, force=False, endpoint=None):
    try:
        from modelscope.hub.file_download import dataset_file_download
    except ImportError:
        raise SystemExit("error: --source modelscope needs the modelscope package: pip install modelscope\n"
                         "(or use the default --source huggingface)")
    target = os.path.join(out_dir, name)
    if force and os.path.exists(target):
        os.remove(target)  # the ModelScope client has no force flag, so drop the old copy first
    return dataset_file_download(dataset_id=MS_REPO, file_path=name, local_dir=out_dir)


FETCHERS = {"huggingface": fetch_huggingface, "modelscope": fetch_modelscope}


def human_size(n):
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def check_names(names, allow_unknown=False):
    """Raise ValueError naming the known files if any name is unknown (unless allow_unknown)."""
    unknown = [n for n in names if n not in FILES]
    if unknown and not allow_unknown:
        raise ValueError(f"unknown file(s): {', '.join(unknown)}\nknown files: {', '.join(FILES)}\n"
                         "(--list shows sizes and stages; --allow_unknown passes any name to the hub)")
    return list(names)


def format_list():
    lines = [f"{'file':<25}{'size (approx.)':>15}  stage"]
    lines += [f"{name:<25}{size:>15}  {stage}" for name, (size, stage) in FILES.items()]
    return "\n".join(lines)


def download(names, source="huggingface", out_dir=DEFAULT_OUT_DIR, force=False, endpoint=None, fetchers=None):
    """Fetch each file into out_dir; return the names that failed (an empty list means success)."""
    fetch = (fetchers or FETCHERS)[source]
    other = "modelscope" if source == "huggingface" else "huggingface"
    if endpoint and source != "huggingface":
        print("note: --endpoint only applies to --source huggingface; ignored")
        endpoint = None
    os.makedirs(out_dir, exist_ok=True)
    failed = []
    for name in names:
        target = os.path.join(out_dir, name)
        if not force and os.path.isfile(target) and os.path.getsize(target) > 0:
            print(f"skip {name}: already in {out_dir} ({human_size(os.path.getsize(target))}); --force to re-download")
            continue
        print(f"downloading {name} from {source} ...", flush=True)
        try:
            path = str(fetch(name, out_dir, force=force, endpoint=endpoint) or target)
        except Exception as e:  # network and hub errors: report, go on with the next file
            print(f"FAILED {name} from {source}: {type(e).__name__}: {e}\n"
                  f"  run again to resume, or try --source {other}", file=sys.stderr)
            failed.append(name)
            continue
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            print(f"FAILED {name} from {source}: {path} is missing or empty after the download; "
                  f"try --source {other}", file=sys.stderr)
            failed.append(name)
            continue
        print(f"ok {name}: {path} ({human_size(os.path.getsize(path))})")
    return failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="dataset file names, e.g. pretrain_hq.jsonl (see --list)")
    parser.add_argument("--source", choices=SOURCES, default="huggingface")
    parser.add_argument("--out_dir", default=DEFAULT_OUT_DIR, help="default: the repository's dataset/ folder")
    parser.add_argument("--list", action="store_true", help="print the known files and exit")
    parser.add_argument("--force", action="store_true", help="download even if the file is already there")
    parser.add_argument("--endpoint", default=None, help="Hugging Face endpoint URL, to use a mirror")
    parser.add_argument("--allow_unknown", action="store_true", help="pass names not in --list to the hub")
    args = parser.parse_args(argv)

    if args.list:
        print(format_list())
        print(f"sizes are approximate; files go to {args.out_dir}")
        return 0
    if not args.names:
        parser.error("give at least one file name (see --list)")
    try:
        names = check_names(args.names, args.allow_unknown)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = download(names, args.source, args.out_dir, args.force, args.endpoint)
    if failed:
        print(f"{len(failed)} of {len(names)} file(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
