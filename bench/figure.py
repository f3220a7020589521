"""
Continuation quality against cost per frame, from the JSON that `evaluate.py --table ... --json`
writes: one point per trained continuation row that has a speed row (matched with its ` T=...`
suffix dropped, so each temperature is its own point at its model's cost), with the row's 95%
interval as a vertical bar; the VAE round trip (ceiling) and a different clip (chance) as dashed
lines. Writes a hand-made SVG (no plotting dependency) and prints the points as a table.

    python -m bench.figure out/table.json [more.json ...] --out docs/quality_cost.svg [--x ms]
"""
import argparse
import json
import math
import os
import re
from xml.sax.saxutils import escape

COLOURS = {'calm': '#1f77b4', 'rq': '#d62728', 'delay': '#2ca02c'}
REFS = {'(vae)': 'VAE round trip', '(other clip)': 'other clip (chance)'}
XCOL = {'mflop': 'frame_mflop', 'ms': 'frame_ms'}
W, H, L, R, T, B = 600, 400, 60, 20, 50, 50   # canvas and margins (px)
PW, PH = W - L - R, H - T - B   # the plot area


def load(path, xcol, ycol):
    """Points [file, name, kind, x, y, lo, hi] and reference levels {label: y} of one table."""
    try:
        with open(path) as f:
            res = json.load(f)
        cont, speed = res['continuation']['rows'], res['speed']['rows']
        pts = []
        for name, row in cont.items():
            base = re.sub(r' T=\S+$', '', name)
            if name.startswith('(') or base not in speed:   # references; steps never timed
                continue
            kind = re.sub(r' steps=\d+$', '', base).split()[-1]   # '<run> calm steps=4' -> calm
            lo, hi = row.get(f'{ycol}_ci') or (row[ycol], row[ycol])
            pts.append([path, name, kind, speed[base][xcol], row[ycol], lo, hi])
        return pts, {label: cont[k][ycol] for k, label in REFS.items() if ycol in cont.get(k, {})}
    except (OSError, ValueError) as e:
        raise SystemExit(f'error: {path}: {e}')
    except (KeyError, TypeError, AttributeError) as e:   # not --table's JSON, or --skip-speed
        raise SystemExit(f'error: {path}: want the continuation and speed rows of evaluate.py '
                         f'--table, with {ycol} ({type(e).__name__}: {e})')


def ticks(lo, hi, log):
    """Round values inside [lo, hi]: 1-2-5 per decade on a log axis (powers of ten only past two
    decades), else a step of 1, 2 or 5 x 10^k giving about four to six ticks."""
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        t = sorted(m * 10.0 ** k for m in ((1, 2, 5) if b - a <= 2 else (1,))
                   for k in range(a, b + 1))
        t = [v for v in t if lo <= v <= hi]
        if len(t) >= 2:
            return t
    step = 10 ** math.floor(math.log10((hi - lo) / 4))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= 6)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def span(vals, f):
    """Axis limits: the values' range in f's space, padded 10% (a single value: +-0.5)."""
    a, b = f(min(vals)), f(max(vals))
    pad = 0.1 * (b - a) or 0.5
    return a - pad, b + pad


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('json', nargs='+', help='evaluate.py --table --json outputs (e.g. two seeds)')
    p.add_argument('--out', default='docs/quality_cost.svg')
    p.add_argument('--x', choices=list(XCOL), default='mflop',
                   help='cost per frame: MFLOP (log scale, machine-independent) or ms (linear)')
    p.add_argument('--y', default='note_acc', help='continuation column (with its _ci interval)')
    args = p.parse_args(argv)
    pts, refs = [], {}
    for path in args.json:
        more, r = load(path, XCOL[args.x], args.y)
        pts += more
        refs = refs or r   # the first file's references: the runs share the held-out clips
    if not pts:
        raise SystemExit(f'error: no continuation row of {args.json} has a speed row to match')
    log = args.x == 'mflop'   # the kinds' and step counts' FLOPs can span decades
    fx = math.log10 if log else (lambda v: v)
    x0, x1 = span([q[3] for q in pts], fx)
    y0, y1 = span([v for q in pts for v in q[4:]] + list(refs.values()), lambda v: v)
    X = lambda v: L + (fx(v) - x0) / (x1 - x0) * PW
    Y = lambda v: H - B - (v - y0) / (y1 - y0) * PH
    text = lambda x, y, s, a='middle', extra='': (f'<text x="{x:.1f}" y="{y:.1f}" '
                                                  f'text-anchor="{a}"{extra}>{escape(s)}</text>')
    line = lambda a, b, c, d, style: (f'<line x1="{a:.1f}" y1="{b:.1f}" x2="{c:.1f}" '
                                      f'y2="{d:.1f}" {style}/>')
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<rect x="{L}" y="{T}" width="{PW}" height="{PH}" fill="none" stroke="black"/>',
           text(W / 2, 18, f'Continuation {args.y} against cost per frame',
                extra=' font-size="13"')]
    for v in ticks(10 ** x0 if log else x0, 10 ** x1 if log else x1, log):
        svg += [line(X(v), T, X(v), H - B, 'stroke="#ddd"'), text(X(v), H - B + 14, f'{v:g}')]
    for v in ticks(y0, y1, False):
        svg += [line(L, Y(v), W - R, Y(v), 'stroke="#ddd"'),
                text(L - 4, Y(v) + 4, f'{v:.3g}', 'end')]
    svg += [text(W / 2, H - 12, 'MFLOP per frame (log scale)' if log else 'ms per frame'),
            text(14, H / 2, args.y, extra=f' transform="rotate(-90 14 {H / 2})"')]
    for label, v in refs.items():
        svg += [line(L, Y(v), W - R, Y(v), 'stroke="#666" stroke-dasharray="5,4"'),
                text(W - R - 4, Y(v) - 4, label, 'end', ' fill="#666"')]
    placed = {}   # row name -> label box (x0, x1, y): a row in several files (seeds) once
    for f, name, kind, x, y, lo, hi in pts:
        c, right = COLOURS.get(kind, 'gray'), X(x) > (L + W - R) / 2   # labels point inwards
        px = X(x) + 6 * (args.json.index(f) - (len(args.json) - 1) / 2)   # files side by side
        svg += [line(px, Y(lo), px, Y(hi), f'stroke="{c}" stroke-width="1.5"'),
                f'<circle cx="{px:.1f}" cy="{Y(y):.1f}" r="4" fill="{c}"/>']
        if name not in placed:   # step down past any label it would overlap (9 px font:
            ax = X(x) + (-10 if right else 10)   # ~5.5 px a character, 10 px a line)
            a, b = (ax - 5.5 * len(name), ax) if right else (ax, ax + 5.5 * len(name))
            ly = Y(y) + 3
            while any(a < v1 and v0 < b and abs(ly - v) < 10 for v0, v1, v in placed.values()):
                ly += 10
            placed[name] = a, b, ly
            svg.append(text(ax, ly, name, 'end' if right else 'start', ' font-size="9"'))
    lx = L   # legend: one row under the title; squares, so <circle>s are the points alone
    for kind in [k for k in COLOURS if any(q[2] == k for q in pts)]:
        svg += [f'<rect x="{lx}" y="30" width="8" height="8" fill="{COLOURS[kind]}"/>',
                text(lx + 12, 38, kind, 'start')]
        lx += 20 + 7 * len(kind)
    svg.append(text(lx, 38, '(bars: 95% interval; dashed: references)', 'start', ' fill="#666"'))
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
        f.write('\n'.join(svg + ['</svg>']) + '\n')
    for q in pts:   # the table names the file when there are several
        q[1] += f' ({os.path.basename(q[0])})' if len(args.json) > 1 else ''
    w = max(len(q[1]) for q in pts)
    print(f"{'row':<{w}}  {XCOL[args.x]:>11}  {args.y:>8}  95% interval")
    for f, name, kind, x, y, lo, hi in sorted(pts, key=lambda q: q[3]):
        print(f'{name:<{w}}  {x:>11.4g}  {y:>8.3f}  [{lo:.3f}, {hi:.3f}]')
    for label, v in refs.items():
        print(f'{label:<{w}}  {"":>11}  {v:>8.3f}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
