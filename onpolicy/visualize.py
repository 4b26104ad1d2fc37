"""Pictures of a denoising trajectory: a terminal animation and a self-contained HTML replay.

    onpolicy sample runs/tiny-stage1-mask --prompt "def add(a, b):" --show
    onpolicy sample runs/tiny-stage1-mask --prompt "def add(a, b):" --html trajectory.html
"""

from __future__ import annotations

import html
import json
import sys
import time

from onpolicy.sampling import TrajectoryRow, replay_states

MASK_GLYPH = "\u2591"  # light shade: a still-masked position


def frames(row: TrajectoryRow, tokenizer, mask_id: int, eos_id: int) -> list[list[tuple[str, str]]]:
    """Per step, the row's generated canvas after the step as (text, kind) pieces; kind is mask | new | done.
    Rebuilt from the trajectory record (`replay_states`), so any decoded row can be pictured."""
    out, previous = [], None
    for state in [*replay_states(row, mask_id)[1:], row.canvas]:
        ids = state.tolist()
        if eos_id in ids and mask_id not in ids[: ids.index(eos_id)]:
            ids = ids[: ids.index(eos_id)]  # cut once everything before EOS is settled
        pieces = []
        for i, t in enumerate(ids):
            if t == mask_id:
                pieces.append((MASK_GLYPH, "mask"))
            else:
                new = previous is None or i >= len(previous) or previous[i] != t
                pieces.append((tokenizer.decode([t]), "new" if new else "done"))
        out.append(pieces)
        previous = ids
    return out


def show(prompt: str, steps: list[list[tuple[str, str]]], delay: float = 0.08, stream=sys.stdout) -> None:
    """Animate in the terminal: masked positions shaded, tokens committed this step in green."""
    for i, pieces in enumerate(steps):
        body = "".join(f"\x1b[32;1m{t}\x1b[0m" if k == "new" else (f"\x1b[2m{t}\x1b[0m" if k == "mask" else t)
                       for t, k in pieces)
        stream.write(f"\x1b[2J\x1b[H{prompt}{body}\n\n\x1b[2mstep {i + 1}/{len(steps)}\x1b[0m\n")
        stream.flush()
        time.sleep(delay)


def trajectory_html(prompt: str, steps: list[list[tuple[str, str]]], title: str = "onpolicy trajectory",
                    verdict: str | None = None) -> str:
    """A self-contained page (no network) that replays the trajectory step by step. It opens on the
    last step (the finished program), with `verdict` (e.g. "passed its tests") under the title."""
    data = json.dumps([[[t, k] for t, k in pieces] for pieces in steps])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }}
 pre {{ font-size: 14px; line-height: 1.4; background: #fafafa; padding: 1em; border: 1px solid #ddd;
       white-space: pre-wrap; }}
 .prompt {{ color: #555; }} .mask {{ color: #bbb; }} .new {{ background: #c8f7c5; }} .done {{ color: #000; }}
 .controls {{ margin: 1em 0; display: flex; gap: 1em; align-items: center; }}
 input[type=range] {{ flex: 1; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
{f'<p class="verdict"><b>{html.escape(verdict)}</b></p>' if verdict else ''}
<div class="controls"><button id="play">play</button><input id="step" type="range" min="0" value="0">
<span id="label"></span></div>
<pre><span class="prompt">{html.escape(prompt)}</span><span id="canvas"></span></pre>
<p>Grey {MASK_GLYPH}: still masked. Green: committed at this step.</p>
<script>
const steps = {data};
const slider = document.getElementById("step"), canvas = document.getElementById("canvas");
const label = document.getElementById("label");
slider.max = steps.length - 1;
function esc(s) {{ return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;"); }}
function render(i) {{
  canvas.innerHTML = steps[i].map(([t, k]) => `<span class="${{k}}">${{esc(t)}}</span>`).join("");
  label.textContent = `step ${{i + 1}} / ${{steps.length}}`;
}}
slider.oninput = () => render(+slider.value);
let timer = null;
document.getElementById("play").onclick = () => {{
  if (timer) {{ clearInterval(timer); timer = null; return; }}
  if (+slider.value >= steps.length - 1) slider.value = 0;
  timer = setInterval(() => {{
    if (+slider.value >= steps.length - 1) {{ clearInterval(timer); timer = null; return; }}
    slider.value = +slider.value + 1; render(+slider.value);
  }}, 120);
}};
slider.value = steps.length - 1;
render(steps.length - 1);  // the finished program first; play replays it from step 1
</script></body></html>
"""
