"""Rank-0 reporting: one metrics dict per step, to a JSONL file always, to wandb if asked, and to a
tqdm progress bar. wandb defaults to disabled and never needs a network unless mode is 'online'
(credentials from `wandb login` or WANDB_API_KEY); WANDB_MODE and WANDB_PROJECT override the recipe.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def wandb_credentials() -> bool:
    """Whether wandb can log in: WANDB_API_KEY, or the entry `wandb login` writes to ~/.netrc (or $NETRC)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def step_seconds(row: dict) -> float:
    """Wall-clock seconds of one logged RL step: its `time/step`, or (runs logged before it existed) the
    sum of its rollout, verify and train times."""
    if "time/step" in row:
        return row["time/step"]
    return row["time/rollout"] + row["time/verify"] + row["time/train"]


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        start_step: int,
        enabled: bool,
        wandb_mode: str = "disabled",
        wandb_project: str = "onpolicy",
        run_name: str | None = None,
        config: dict | None = None,
        progress: bool = True,
    ):
        self.enabled = enabled
        self.output_dir = output_dir
        self.completions_file = None
        self.bar = None
        self.wandb = None
        self.file = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.file = (output_dir / "metrics.jsonl").open("a", encoding="utf-8")
        # wandb's own variables win, as in every wandb tool
        wandb_mode = os.environ.get("WANDB_MODE") or wandb_mode
        wandb_project = os.environ.get("WANDB_PROJECT") or wandb_project
        if wandb_mode not in ("disabled", "offline", "online", "dryrun", "run"):
            raise RuntimeError(f"WANDB_MODE / logging.wandb = '{wandb_mode}' is not one of disabled, "
                               "offline, online")
        if wandb_mode != "disabled":
            if wandb_mode in ("online", "run") and not wandb_credentials():
                raise RuntimeError("logging.wandb=online needs wandb credentials: run `wandb login` or set "
                                   "WANDB_API_KEY; "
                                   "or use logging.wandb=offline (sync later) or disabled")
            import wandb

            self.wandb = wandb.init(
                project=wandb_project, name=run_name or output_dir.name, dir=str(output_dir), mode=wandb_mode,
                config=config
            )
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=output_dir.name, dynamic_ncols=True)
        self._t0 = time.perf_counter()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # tensors read here, once
        metrics = {k: v.item() if hasattr(v, "item") else v for k, v in metrics.items() if v is not None}
        row = {"step": step, "time": round(time.perf_counter() - self._t0, 3), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def completions(self, step: int, rows: list[dict]) -> None:
        """Sampled completions with their verdicts: completions.jsonl beside metrics.jsonl, and a wandb
        table when wandb is on."""
        if not self.enabled or not rows:
            return
        if self.completions_file is None:
            self.completions_file = (self.output_dir / "completions.jsonl").open("a", encoding="utf-8")
        for row in rows:
            self.completions_file.write(json.dumps({"step": step, **row}) + "\n")
        self.completions_file.flush()
        if self.wandb is not None:
            import wandb

            keys = list(rows[0])
            self.wandb.log({"completions": wandb.Table(columns=["step", *keys],
                                                       data=[[step, *(r[k] for k in keys)] for r in rows])},
                           step=step)

    def progress(self, step: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.completions_file is not None:
            self.completions_file.close()
        if self.wandb is not None:
            self.wandb.finish()
