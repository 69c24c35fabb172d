"""Run logging: console, metrics.jsonl, TensorBoard always; wandb when asked; a loss-curve PNG.

Only the main rank logs. JSONL lines are appended and flushed per step so a killed run keeps
everything up to its last step, and a resumed run continues the same file.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

logger = logging.getLogger("veomni")


def setup_console_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S")


class RunLogger:
    def __init__(self, output_dir: str, enabled: bool = True, use_wandb: bool = False,
                 wandb_project: Optional[str] = None, config_dict: Optional[dict] = None,
                 resume_step: int = 0):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.eval_path = self.dir / "eval_metrics.jsonl"
        if resume_step:
            # Drop lines past the checkpoint we resume from: the steps after it are replayed, and
            # duplicated steps would make the curve and any comparison of runs wrong.
            for path in (self.jsonl_path, self.eval_path):
                _truncate_after(path, resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))
        if use_wandb:
            try:
                import wandb
            except ImportError as e:
                raise ImportError("train.use_wandb=true needs `pip install wandb` (or .[wandb]).") from e
            self.wandb = wandb.init(project=wandb_project or "veomni-dllm", config=config_dict,
                                    dir=str(self.dir), resume="allow")

    def log(self, metrics: dict, step: int, kind: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        path = self.jsonl_path if kind == "train" else self.eval_path
        with open(path, "a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def plot_loss_curve(output_dir: str) -> Optional[Path]:
    """Write <output_dir>/loss_curve.png from metrics.jsonl (and eval_metrics.jsonl if present)."""
    out = Path(output_dir)
    src = out / "metrics.jsonl"
    if not src.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", lw=1)
    ev = out / "eval_metrics.jsonl"
    if ev.exists():
        erows = [json.loads(line) for line in ev.read_text().splitlines() if line.strip()]
        if erows:
            ax.plot([r["step"] for r in erows], [r["eval_loss"] for r in erows], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def eval_summary(output_dir: str) -> Optional[str]:
    """One line comparing the first and last held-out evaluation of a run (eval_metrics.jsonl), or
    None with fewer than two. Every evaluation scores the same rows under the same fixed noise, so
    the two figures measure the model; with objective mdm/bd3lm and loss_weighting=inv_t the eval
    loss is a one-sample Monte-Carlo estimate of the held-out -ELBO in nats per token."""
    path = Path(output_dir) / "eval_metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    change = 100.0 * (last["eval_loss"] - first["eval_loss"]) / max(abs(first["eval_loss"]), 1e-12)
    return (f"held-out eval loss (nats/token): {first['eval_loss']:.3f} at step {first['step']} -> "
            f"{last['eval_loss']:.3f} at step {last['step']} ({change:+.0f}%)")
