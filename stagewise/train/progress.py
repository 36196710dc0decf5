"""Progress display: a live tqdm bar on a terminal, plain log lines everywhere else."""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """mode: auto (bar on a TTY, else plain), bar, plain or none. label: the stage's name in a staged run,
    shown as the bar's description and at the end of each plain line."""

    def __init__(self, total_steps: int, start_step: int, mode: str = "auto", every: int = 10, stream=None,
                 label: str | None = None):
        self.stream = stream or sys.stderr
        self.label = label
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode, self.every, self.total = mode, every, total_steps
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.tok_s_avg = None
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, file=self.stream, unit="step", desc=label,
                            dynamic_ncols=True, bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def update(self, step: int, loss: float, tokens_per_s: float, mfu: float, val_loss: float | None = None):
        """step is the number of completed steps."""
        # An exponential average steadies the displayed throughput without hiding trends.
        self.tok_s_avg = tokens_per_s if self.tok_s_avg is None else 0.9 * self.tok_s_avg + 0.1 * tokens_per_s
        mfu = mfu * self.tok_s_avg / tokens_per_s  # MFU of the averaged throughput shown beside it
        if self.mode == "bar":
            post = {"loss": f"{loss:.4f}", "tok/s": f"{self.tok_s_avg:,.0f}", "MFU": f"{100 * mfu:.1f}%"}
            if val_loss is not None:
                post["val"] = f"{val_loss:.4f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif self.mode == "plain" and (step % self.every == 0 or step == self.total or val_loss is not None):
            done = step - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.total - step) if done else 0.0
            val = f" | val {val_loss:.4f}" if val_loss is not None else ""
            print(f"step {step}/{self.total} | loss {loss:.4f}{val} | {self.tok_s_avg:,.0f} tok/s | "
                  f"MFU {100 * mfu:.1f}% | ETA {_fmt_time(eta)}" + (f" | stage {self.label}" if self.label else ""),
                  file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "none":
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
