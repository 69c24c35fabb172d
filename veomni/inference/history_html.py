"""`--save_history FILE.html`: one self-contained page that replays the unmasking order.

The page shows every row's final completion with each token coloured by the step at which it got
its final value (blue = early, red = late) and carrying that step in `data-step` (and a tooltip).
A slider and a play button (inline JavaScript, no external assets) rebuild the text at any step
from the recorded events, masks shown as `░`. Positions after a row's first EOS are left out.
p2 can revise tokens: its events replay every change, the colour is the step of the last one.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from veomni.inference.live import MASK_GLYPH, _printable


def history_events(output) -> List[Dict]:
    """Per row: {'length', 'events': [[step, pos, token], ...] (token -1 = masked again),
    'final': [token per kept position], 'step': [final-change step per kept position]}."""
    if not output.history:
        raise ValueError("the output has no history: generate with output_history=True")
    p = output.prompt_len
    cfg = output.config
    eos = set(cfg.eos_token_id or []) if cfg is not None else set()
    mask_id = cfg.mask_token_id
    seqs = output.sequences[:, p:].tolist()
    frames = [f[:, p:p + len(seqs[0])].tolist() for f in output.history]
    rows = []
    for b, final_row in enumerate(seqs):
        # Keep up to and including the first EOS of the returned sequence (the rest is padding).
        length = next((i + 1 for i, t in enumerate(final_row) if t in eos), len(final_row))
        prev = [mask_id] * length
        events, step_of = [], [0] * length
        for s, frame in enumerate(frames, start=1):
            for pos in range(length):
                tok = frame[b][pos]
                if tok != prev[pos]:
                    events.append([s, pos, -1 if tok == mask_id else tok])
                    step_of[pos] = s
                    prev[pos] = tok
        rows.append(dict(length=length, events=events, final=prev, step=step_of))
    return rows


def _colour(step: int, total: int) -> str:
    hue = 230 - 230 * (step - 1) / max(total - 1, 1)  # 230 = blue (first step) .. 0 = red (last)
    return f"hsl({hue:.0f},75%,82%)"


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.controls{position:sticky;top:0;background:#fff;padding:.6em 0;border-bottom:1px solid #ddd}
.controls input{width:40em;vertical-align:middle}
.row{margin:1.2em 0}.prompt{color:#777;white-space:pre-wrap;font-family:monospace}
.gen{white-space:pre-wrap;font-family:monospace;line-height:1.6}
.tok{border-radius:3px;padding:0 1px}.mask{color:#aaa}
.meta{color:#555;font-size:.9em}
"""

_SCRIPT = """
const D = JSON.parse(document.getElementById('data').textContent);
const slider = document.getElementById('step'), label = document.getElementById('label');
function colour(s){const h=230-230*(s-1)/Math.max(D.steps-1,1);return 'hsl('+h.toFixed(0)+',75%,82%)';}
function show(step){
  label.textContent = 'step ' + step + ' / ' + D.steps;
  D.rows.forEach((row, b) => {
    const tok = new Array(row.length).fill(-1), at = new Array(row.length).fill(0);
    for (const [s, pos, t] of row.events){ if (s > step) break; tok[pos] = t; at[pos] = s; }
    const spans = document.getElementById('gen' + b).children;
    for (let i = 0; i < row.length; i++){
      const el = spans[i];
      if (tok[i] < 0){ el.textContent = D.glyph; el.className = 'tok mask'; el.style.background = ''; }
      else { el.textContent = D.vocab[tok[i]]; el.className = 'tok';
             el.style.background = colour(at[i]); el.style.outline = at[i] === step ? '1px solid #333' : ''; }
    }
  });
}
let timer = null;
document.getElementById('play').onclick = function(){
  if (timer){ clearInterval(timer); timer = null; this.textContent = '\\u25b6 play'; return; }
  if (+slider.value >= D.steps) slider.value = 0;
  this.textContent = '\\u275a\\u275a pause';
  timer = setInterval(() => {
    if (+slider.value >= D.steps){ clearInterval(timer); timer = null;
      document.getElementById('play').textContent = '\\u25b6 play'; return; }
    slider.value = +slider.value + 1; show(+slider.value);
  }, Math.max(30, 3000 / D.steps));
};
slider.oninput = () => show(+slider.value);
"""


def write_history_html(path, tokenizer, output, prompts: Optional[Sequence[str]] = None,
                       title: str = "Masked-diffusion decoding") -> Path:
    """Write the replay page for a GenerationOutput made with output_history=True; returns the path."""
    rows = history_events(output)
    steps = len(output.history)
    ids = sorted({t for r in rows for t in r["final"]} | {e[2] for r in rows for e in r["events"] if e[2] >= 0})
    vocab = {t: _printable(tokenizer.decode([t], skip_special_tokens=False)) for t in ids}
    cfg = output.config
    st = output.stats or {}
    meta = (f"alg={cfg.alg} steps={steps} use_cache={cfg.use_cache} | NFE={st.get('nfe')} "
            f"tokens/forward={st.get('tokens_per_forward', 0):.2f} wall={st.get('wall_time_s', 0):.2f}s")
    body = [f"<h1>{html.escape(title)}</h1>", f"<p class='meta'>{html.escape(meta)}</p>",
            "<div class='controls'><button id='play'>&#9654; play</button> "
            f"<input type='range' id='step' min='0' max='{steps}' value='{steps}'> "
            f"<span id='label'>step {steps} / {steps}</span>"
            "<div class='meta'>colour = step a token was decoded at: blue early, red late</div></div>"]
    for b, row in enumerate(rows):
        prompt = prompts[b] if prompts is not None and b < len(prompts) else None
        spans = "".join(
            f"<span class='tok' data-step='{s}' title='step {s}' style='background:{_colour(s, steps)}'>"
            f"{html.escape(vocab[t])}</span>" for t, s in zip(row["final"], row["step"]))
        body.append("<div class='row'>" + (f"<div class='prompt'>{html.escape(prompt)}</div>" if prompt else "")
                    + f"<div class='gen' id='gen{b}'>{spans}</div></div>")
    data = dict(steps=steps, glyph=MASK_GLYPH, vocab={str(t): s for t, s in vocab.items()},
                rows=[dict(length=r["length"], events=r["events"]) for r in rows])
    # "</" inside the JSON would end the <script> element early (a token may be "</").
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    page = ("<!doctype html>\n<html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body)
            + f"\n<script type='application/json' id='data'>{payload}</script>\n<script>{_SCRIPT}</script>\n"
            "</body></html>\n")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
