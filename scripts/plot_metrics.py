"""Plot loss curves from the metrics files the trainers write (out/*_metrics.jsonl) into one PNG.

    python scripts/plot_metrics.py out/pretrain_512_metrics.jsonl out/full_sft_512_metrics.jsonl -o out/loss.png
    python scripts/plot_metrics.py out/*_metrics.jsonl

Each file becomes one panel of loss against optimizer step: the logged points faint, and over them a
smoothed curve (a centred moving mean over a tenth of the points), so that a stage whose batches differ a lot
in loss (length-grouped SFT batches) still shows its trend. When a run was resumed,
a step logged twice keeps its latest value.
"""
import argparse
import json
import os


def load_series(path, key="loss"):
    """{step: value} of one metrics JSONL (later lines win, so a resumed run overwrites replayed steps)."""
    series = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{path} line {line_number}: not valid JSON ({err.msg})") from None
            if key in record and "step" in record:
                series[record["step"]] = record[key]
    if not series:
        raise SystemExit(f"{path} has no '{key}' values to plot")
    return dict(sorted(series.items()))


def smooth(values, window=None):
    """Centred moving mean: each point becomes the mean of the `window` points around it, fewer at the two ends
    but always as many on each side, so a straight trend stays straight (no lag, unlike an EMA).
    window None: a tenth of the points (at least 1)."""
    window = max(1, len(values) // 10) if window is None else max(1, window)
    smoothed = []
    for i in range(len(values)):
        half = min(window // 2, i, len(values) - 1 - i)
        smoothed.append(sum(values[i - half:i + half + 1]) / (2 * half + 1))
    return smoothed


def plot(paths, output, key="loss", title="MiniMind training", window=None):
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    columns = min(4, len(paths))  # a grid, in the order given (the order the stages ran)
    rows = -(-len(paths) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(paths):]:
        ax.set_visible(False)
    for number, (ax, path) in enumerate(zip(axes.flat, paths), 1):
        series = load_series(path, key)
        steps, values = list(series), list(series.values())
        ax.plot(steps, values, linewidth=0.8, alpha=0.3, color="tab:blue", label="logged")
        ax.plot(steps, smooth(values, window), linewidth=1.8, color="tab:blue", label="moving mean")
        if number == 1:
            ax.legend(fontsize="small")
        ax.set_title(f"{number}. {os.path.basename(path).replace('_metrics.jsonl', '')}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)
    return output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="metrics JSONL files")
    parser.add_argument("-o", "--output", default="out/loss_curves.png")
    parser.add_argument("--key", default="loss", help="which metric to plot")
    parser.add_argument("--window", type=int, default=None,
                        help="points in the moving mean (1 = none; default: a tenth of each run's points)")
    args = parser.parse_args()
    if args.window is not None and args.window < 1:
        parser.error(f"--window {args.window}: expected at least 1 point")
    print(plot(args.paths, args.output, args.key, window=args.window))


if __name__ == "__main__":
    main()
