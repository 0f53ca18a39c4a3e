"""Render a run's per-channel loss curves from its TensorBoard event files into a PNG.

``python -m launch.plot_channel_loss RUN_DIR --out curves.png`` reads every event file under ``RUN_DIR`` (a resumed
run writes a new one; for a step logged twice the later write wins), takes the ``channel_loss/<name>`` and
``eval_channel_loss/<name>`` scalars, and draws one curve per channel: training on the left, evaluation on the right
when the run evaluated. A PNG needs no TensorBoard server, so it fits reports, chat threads and CI artifacts.
"""
from __future__ import annotations

import argparse
import os
import sys

KINDS = {"train": "channel_loss/", "eval": "eval_channel_loss/"}

Curves = dict[str, dict[str, tuple[list[int], list[float]]]]


def event_files(run_dir: str) -> list[str]:
    """Every TensorBoard event file under ``run_dir``, oldest first (file names carry the creation time)."""
    found = []
    for root, _dirs, files in os.walk(run_dir):
        found += [os.path.join(root, f) for f in files if f.startswith("events.out.tfevents.")]
    def created(path: str) -> int:
        # Names are events.out.tfevents.<unix time>.<host>...: sort on the time, not on the directory.
        stamp = os.path.basename(path).split(".")[3]
        return int(stamp) if stamp.isdigit() else 0

    return sorted(found, key=lambda p: (created(p), p))


def read_curves(run_dir: str) -> Curves:
    """``{"train"|"eval": {channel: (steps, values)}}`` from the event files under ``run_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, dict[str, dict[int, tuple[float, float]]]] = {kind: {} for kind in KINDS}
    for path in event_files(run_dir):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})  # 0 keeps every point, not a sample
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for kind, prefix in KINDS.items():
                if tag.startswith(prefix):
                    series = points[kind].setdefault(tag[len(prefix):], {})
                    for event in acc.Scalars(tag):
                        old = series.get(event.step)
                        if old is None or event.wall_time >= old[0]:
                            series[event.step] = (event.wall_time, event.value)
    curves: Curves = {kind: {} for kind in KINDS}
    for kind, channels in points.items():
        for name, series in sorted(channels.items()):
            steps = sorted(series)
            curves[kind][name] = (steps, [series[s][1] for s in steps])
    return curves


def _smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's exponential moving average, so the PNG matches what the UI shows at the same setting."""
    out, last = [], None
    for v in values:
        last = v if last is None else weight * last + (1 - weight) * v
        out.append(last)
    return out


def render(run_dir: str, out: str, smooth: float = 0.0, title: str | None = None):
    """Draw the curves of ``run_dir`` into ``out``; returns the matplotlib figure.

    Raises:
        ValueError: no channel-loss scalar under ``run_dir``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"--smooth {smooth} is outside [0, 1); use e.g. 0.6 like TensorBoard's slider")
    curves = read_curves(run_dir)
    kinds = [k for k in KINDS if curves[k]]
    if not kinds:
        raise ValueError(
            f"no channel_loss/<name> scalars in the event files under {run_dir!r} "
            f"({len(event_files(run_dir))} event files); was the run trained with channel loss on?"
        )
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), dpi=110, squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for name, (steps, values) in curves[kind].items():
            ax.plot(steps, _smooth(values, smooth), marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        ax.set_title(f"{kind} loss per channel")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(title="channel", fontsize="small")
    fig.suptitle(title or os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return fig


def main(argv: list[str] | None = None) -> int:
    """Command line: ``RUN_DIR --out file.png [--smooth W] [--title T]``."""
    p = argparse.ArgumentParser(prog="python -m launch.plot_channel_loss", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="the run's output directory (event files are searched recursively)")
    p.add_argument("--out", help="PNG to write (default: RUN_DIR/channel_loss.png)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA weight in [0, 1), as in TensorBoard (default 0)")
    p.add_argument("--title", help="figure title (default: the run directory's name)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.run_dir, "channel_loss.png")
    try:
        render(args.run_dir, out, args.smooth, args.title)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
