"""Generate the bundled SURD-format sample in data/sample/ (deterministic; PIL + stdlib only).

    python data/make_sample.py                    # writes data/sample/ (seed 0, 64 rows)
    python data/make_sample.py --out DIR --seed 1 --rows 64

Layout (Hugging Face imagefolder, like SURD): ``images/<category>_<nnn>.png|.jpg`` and
``metadata.jsonl`` with ``file_name``, ``text`` (the SIMPLE narrative prompt), ``prompt`` (the
COMPLEX keyword prompt, with weights like ``(masterpiece:1.2)``, some ``<lora:...>`` tags, and
some longer than CLIP's 77 tokens) and an extra ``category`` field (action, color or counting:
the paper's three evaluation categories), which readers ignore.

Images are 128x128 drawings: stick figures doing things (action), coloured objects on coloured
surfaces (color), and N objects of a kind (counting), so that a prompt matches its picture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil

from PIL import Image, ImageDraw

SIZE = 128

COLORS = {
    "red": (210, 40, 40), "blue": (40, 70, 200), "green": (40, 160, 60), "yellow": (240, 210, 40),
    "purple": (130, 50, 170), "orange": (240, 140, 30), "pink": (240, 130, 180), "white": (245, 245, 245),
    "black": (25, 25, 25), "brown": (120, 75, 40),
}
NUMBERS = ["one", "two", "three", "four", "five", "six"]

QUALITY = ["masterpiece", "best quality", "ultra detailed", "8k", "highly detailed", "intricate", "sharp focus",
           "high resolution", "absurdres", "extremely detailed", "professional", "award winning"]
STYLE = ["digital painting", "concept art", "illustration", "octane render", "unreal engine 5", "cinematic lighting",
         "volumetric lighting", "soft lighting", "studio lighting", "trending on artstation", "smooth",
         "elegant", "vibrant colors", "depth of field", "bokeh", "hdr", "photorealistic", "matte painting",
         "golden hour", "rim light", "film grain", "wide angle", "symmetrical composition", "pastel colors"]
ARTISTS = ["mira castellan", "jonas veld", "aiko tanabe", "rafael orsini", "elena moravec", "tomas lindqvist"]
LORAS = ["detail_tweaker:0.6", "add_detail:0.8", "epi_noiseoffset:0.5", "more_details:0.4", "film_look:0.7"]
NEGATIVE_HINTS = ["no watermark", "no text", "clean background"]


def complex_prompt(rng: random.Random, subject: str, extra: list[str], long: bool) -> str:
    """A SURD-like keyword prompt: subject, scene words, quality tags with weights, style, artists, lora."""
    parts = [subject] + extra
    q = rng.sample(QUALITY, 6 if long else 3)
    q = [f"({w}:{rng.choice(['1.1', '1.2', '1.3', '1.4'])})" if rng.random() < 0.4 else w for w in q]
    parts += q
    parts += rng.sample(STYLE, 16 if long else rng.randint(3, 5))
    if long:
        parts += rng.sample(NEGATIVE_HINTS, 2)
        parts += [f"({w}:1.{rng.randint(1, 5)})" for w in rng.sample(STYLE, 4)]
    parts.append("art by " + " and ".join(rng.sample(ARTISTS, 2)))
    if rng.random() < 0.35:
        parts.append(f"<lora:{rng.choice(LORAS)}>")
    return ", ".join(parts)


def a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# --------------------------------------------------------------------------- drawing helpers


def canvas(sky=(150, 200, 240), ground=(110, 170, 90), horizon=92) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    im = Image.new("RGB", (SIZE, SIZE), sky)
    d = ImageDraw.Draw(im)
    d.rectangle([0, horizon, SIZE, SIZE], fill=ground)
    return im, d


def person(d, x, y, s=1.0, arms=((-12, 8), (12, 8)), legs=((-8, 22), (8, 22)), color=(20, 20, 20)):
    """Stick figure with its hip at (x, y); arms and legs are end offsets from shoulder/hip."""
    w = max(2, int(3 * s))
    neck = (x, y - 24 * s)
    d.ellipse([x - 6 * s, y - 38 * s, x + 6 * s, y - 26 * s], outline=color, width=w)
    d.line([neck, (x, y)], fill=color, width=w)
    sh = (x, y - 18 * s)
    for ax, ay in arms:
        d.line([sh, (x + ax * s, sh[1] + ay * s)], fill=color, width=w)
    for lx, ly in legs:
        d.line([(x, y), (x + lx * s, y + ly * s)], fill=color, width=w)
    return sh


def star(d, cx, cy, r, fill):
    pts = []
    for i in range(10):
        rr = r if i % 2 == 0 else r * 0.45
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    d.polygon(pts, fill=fill)


def spots(rng, n, region, min_dist):
    """n non-overlapping points in region (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = region
    pts: list[tuple[int, int]] = []
    tries = 0
    while len(pts) < n:
        p = (rng.randint(x0, x1), rng.randint(y0, y1))
        tries += 1
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist ** 2 for q in pts) or tries > 2000:
            pts.append(p)
    return pts


# --------------------------------------------------------------------------- action


def act_bicycle(d, rng):
    d.ellipse([24, 86, 52, 114], outline=(30, 30, 30), width=3)
    d.ellipse([76, 86, 104, 114], outline=(30, 30, 30), width=3)
    d.line([(38, 100), (60, 80), (90, 100), (38, 100)], fill=(200, 30, 30), width=3)
    d.line([(60, 80), (84, 76), (90, 100)], fill=(200, 30, 30), width=3)
    person(d, 58, 76, 0.9, arms=((24, 6), (22, 4)), legs=((4, 22), (-6, 22)))
    return "riding a bicycle", ["bicycle", "street"]


def act_running(d, rng):
    person(d, 64, 80, 1.1, arms=((14, -4), (-12, 14)), legs=((-14, 18), (14, 16)))
    return "running across a field", ["running", "motion blur", "field"]


def act_jumping(d, rng):
    person(d, 64, 62, 1.1, arms=((-14, -16), (14, -16)), legs=((-10, 14), (10, 14)))
    d.ellipse([50, 104, 78, 110], fill=(80, 120, 70))
    return "jumping in the air", ["jumping", "mid-air", "joyful"]


def act_waving(d, rng):
    person(d, 64, 84, 1.1, arms=((12, -18), (-10, 14)))
    return "waving hello", ["waving hand", "friendly", "smiling"]


def act_dog(d, rng):
    person(d, 44, 84, 1.0, arms=((16, 12), (-10, 14)))
    d.ellipse([76, 96, 104, 108], fill=(120, 75, 40))
    d.ellipse([100, 88, 112, 100], fill=(120, 75, 40))
    for lx in (80, 86, 94, 100):
        d.line([(lx, 106), (lx, 114)], fill=(120, 75, 40), width=3)
    d.line([(60, 78), (104, 94)], fill=(200, 30, 30), width=1)
    return "walking a dog", ["dog on a leash", "park", "afternoon walk"]


def act_kick(d, rng):
    person(d, 54, 80, 1.0, arms=((-14, 4), (12, 10)), legs=((-6, 22), (20, 12)))
    d.ellipse([76, 86, 92, 102], fill=(245, 245, 245), outline=(20, 20, 20))
    return "kicking a ball", ["soccer ball", "sports", "dynamic pose"]


def act_umbrella(d, rng):
    sh = person(d, 64, 84, 1.0, arms=((10, -14), (-10, 14)))
    d.line([(74, 52), (74, 30)], fill=(40, 40, 40), width=2)
    d.pieslice([46, 16, 102, 48], 180, 360, fill=(40, 70, 200))
    for i in range(12):
        x = rng.randint(4, 124)
        y = rng.randint(4, 80)
        d.line([(x, y), (x - 2, y + 6)], fill=(90, 110, 160), width=1)
    return "holding an umbrella in the rain", ["rain", "umbrella", "moody", "wet street"]


def act_fishing(d, rng):
    d.rectangle([0, 100, SIZE, SIZE], fill=(50, 100, 180))
    person(d, 34, 78, 1.0, arms=((18, -4), (16, 0)))
    d.line([(52, 56), (104, 30)], fill=(90, 60, 30), width=2)
    d.line([(104, 30), (104, 104)], fill=(220, 220, 220), width=1)
    return "fishing by a lake", ["fishing rod", "lake", "calm water"]


def act_reading(d, rng):
    d.rectangle([80, 70, 112, 92], fill=(120, 75, 40))
    person(d, 54, 84, 1.0, arms=((14, -2), (16, 2)))
    d.rectangle([66, 58, 80, 70], fill=(240, 240, 230), outline=(40, 40, 40))
    return "reading a book", ["book", "cozy", "quiet afternoon"]


def act_kite(d, rng):
    person(d, 40, 86, 1.0, arms=((14, -16), (-10, 14)))
    d.polygon([(96, 14), (108, 28), (96, 44), (84, 28)], fill=(240, 140, 30))
    d.line([(54, 54), (96, 44)], fill=(40, 40, 40), width=1)
    return "flying a kite", ["kite", "windy day", "blue sky"]


def act_dancing(d, rng):
    person(d, 44, 82, 1.0, arms=((12, -14), (-14, -6)), legs=((-12, 20), (6, 22)))
    person(d, 86, 82, 1.0, arms=((-12, -14), (14, -6)), legs=((12, 20), (-6, 22)))
    return "dancing together", ["two people dancing", "celebration", "music"]


ACTIONS = [act_bicycle, act_running, act_jumping, act_waving, act_dog, act_kick, act_umbrella, act_fishing,
           act_reading, act_kite, act_dancing]
SUBJECTS = ["a person", "a man", "a woman", "a child", "a girl", "a boy", "an old man", "a young woman"]


def make_action(rng, i):
    im, d = canvas()
    d.ellipse([100, 6, 120, 26], fill=(250, 220, 80))
    fn = ACTIONS[i % len(ACTIONS)]
    verb, scene = fn(d, rng)
    subj = rng.choice(SUBJECTS)
    simple = f"{subj} {verb}"
    return im, simple, simple, scene


# --------------------------------------------------------------------------- color


def obj_cube(d, x, y, col):
    dark = tuple(int(c * 0.7) for c in col)
    light = tuple(min(255, int(c * 1.15) + 20) for c in col)
    d.rectangle([x - 18, y - 30, x + 12, y], fill=col)
    d.polygon([(x - 18, y - 30), (x - 8, y - 40), (x + 22, y - 40), (x + 12, y - 30)], fill=light)
    d.polygon([(x + 12, y - 30), (x + 22, y - 40), (x + 22, y - 10), (x + 12, y)], fill=dark)


def obj_ball(d, x, y, col):
    d.ellipse([x - 16, y - 32, x + 16, y], fill=col)
    d.ellipse([x - 9, y - 26, x - 3, y - 20], fill=(255, 255, 255))


def obj_cone(d, x, y, col):
    d.polygon([(x, y - 38), (x - 16, y), (x + 16, y)], fill=col)


def obj_cup(d, x, y, col):
    d.rectangle([x - 12, y - 24, x + 10, y], fill=col)
    d.arc([x + 4, y - 20, x + 18, y - 6], 270, 90, fill=col, width=3)


def obj_vase(d, x, y, col):
    d.ellipse([x - 14, y - 26, x + 14, y], fill=col)
    d.rectangle([x - 6, y - 38, x + 6, y - 22], fill=col)


OBJECTS = {"cube": obj_cube, "ball": obj_ball, "cone": obj_cone, "cup": obj_cup, "vase": obj_vase}
SURFACES = ["table", "floor", "rug", "shelf"]


def make_color(rng, i):
    c1, c2 = rng.sample(sorted(COLORS), 2)
    name = sorted(OBJECTS)[i % len(OBJECTS)]
    surf = rng.choice(SURFACES)
    im = Image.new("RGB", (SIZE, SIZE), (225, 220, 210))
    d = ImageDraw.Draw(im)
    if surf == "table":
        d.rectangle([10, 84, 118, 94], fill=COLORS[c2])
        d.rectangle([16, 94, 24, 126], fill=COLORS[c2])
        d.rectangle([104, 94, 112, 126], fill=COLORS[c2])
        base = 84
    elif surf == "shelf":
        d.rectangle([0, 80, SIZE, 90], fill=COLORS[c2])
        base = 80
    else:
        d.rectangle([0, 88, SIZE, SIZE], fill=COLORS[c2])
        base = 100
    if rng.random() < 0.5:  # a second object, with its own colour
        c3 = rng.choice([c for c in sorted(COLORS) if c not in (c1, c2)])
        other = rng.choice([o for o in sorted(OBJECTS) if o != name])
        OBJECTS[name](d, 44, base, COLORS[c1])
        OBJECTS[other](d, 92, base, COLORS[c3])
        simple = f"{a(c1)} {name} next to {a(c3)} {other} on {a(c2)} {surf}"
    else:
        OBJECTS[name](d, 64, base, COLORS[c1])
        simple = f"{a(c1)} {name} on {a(c2)} {surf}"
    return im, simple, simple.split(" ", 1)[1], ["still life", f"{c1} and {c2}", "studio"]


# --------------------------------------------------------------------------- counting


def cnt_stars(d, rng, n, col):
    for x, y in spots(rng, n, (16, 14, 112, 70), 24):
        star(d, x, y, 10, col)
    return "stars", "in the night sky", dict(sky=(20, 25, 60), ground=(30, 45, 35))


def cnt_balloons(d, rng, n, col):
    for x, y in spots(rng, n, (16, 16, 112, 64), 22):
        d.ellipse([x - 9, y - 12, x + 9, y + 10], fill=col)
        d.line([(x, y + 10), (x, y + 32)], fill=(60, 60, 60), width=1)
    return "balloons", "floating over a field", {}


def cnt_apples(d, rng, n, col):
    xs = [20 + i * (88 // max(1, n - 1)) for i in range(n)] if n > 1 else [64]
    for x in xs:
        d.ellipse([x - 9, 96, x + 9, 114], fill=col)
        d.line([(x, 96), (x + 2, 90)], fill=(90, 60, 30), width=2)
    return "apples", "on the grass", {}


def cnt_trees(d, rng, n, col):
    xs = [18 + i * (92 // max(1, n - 1)) for i in range(n)] if n > 1 else [64]
    for x in xs:
        d.rectangle([x - 3, 84, x + 3, 100], fill=(100, 60, 30))
        d.polygon([(x, 40), (x - 14, 86), (x + 14, 86)], fill=col)
    return "trees", "in a meadow", {}


def cnt_birds(d, rng, n, col):
    for x, y in spots(rng, n, (14, 12, 114, 70), 20):
        d.line([(x - 8, y - 4), (x, y + 2), (x + 8, y - 4)], fill=col, width=3)
    return "birds", "flying in the sky", {}


def cnt_houses(d, rng, n, col):
    xs = [20 + i * (88 // max(1, n - 1)) for i in range(n)] if n > 1 else [64]
    w = 9 if n > 4 else 12
    for x in xs:
        d.rectangle([x - w, 76, x + w, 100], fill=col)
        d.polygon([(x - w - 3, 76), (x, 60), (x + w + 3, 76)], fill=(150, 50, 40))
    return "houses", "in a small village", {}


COUNTABLE = [cnt_stars, cnt_balloons, cnt_apples, cnt_trees, cnt_birds, cnt_houses]
COUNT_COLORS = {"stars": ["yellow", "white", "orange"], "balloons": ["red", "blue", "yellow", "pink", "purple"],
                "apples": ["red", "green", "yellow"], "trees": ["green", "orange", "brown"],
                "birds": ["black", "white", "blue"], "houses": ["white", "yellow", "blue", "pink"]}


def make_counting(rng, i):
    fn = COUNTABLE[i % len(COUNTABLE)]
    n = rng.randint(1, 6)
    probe_im = Image.new("RGB", (1, 1))
    name, where, look = fn(ImageDraw.Draw(probe_im), random.Random(0), 1, (0, 0, 0))  # names only
    colname = rng.choice(COUNT_COLORS[name])
    im, d = canvas(**look)
    fn(d, rng, n, COLORS[colname])
    noun = name if n > 1 else name[:-1]
    simple = f"{NUMBERS[n - 1]} {colname} {noun} {where}"
    if n == 1:
        simple = "a single " + simple.split(" ", 1)[1]
    return im, simple, simple, [f"exactly {n} {noun}", "simple composition"]


# --------------------------------------------------------------------------- main

MAKERS = {"action": make_action, "color": make_color, "counting": make_counting}


def build(out: str, seed: int = 0, rows: int = 64) -> list[dict]:
    rng = random.Random(seed)
    img_dir = os.path.join(out, "images")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(img_dir)
    records = []
    cats = list(MAKERS)
    for i in range(rows):
        cat = cats[i % 3]
        im, simple, subject, scene = MAKERS[cat](rng, i // 3)
        ext = "jpg" if i % 8 == 5 else "png"
        file_name = f"images/{cat}_{i:03d}.{ext}"
        if ext == "jpg":
            im.save(os.path.join(out, file_name), "JPEG", quality=88)
        else:
            im.save(os.path.join(out, file_name), "PNG", optimize=True)
        long = rng.random() < 0.3
        records.append({
            "file_name": file_name,
            "text": simple[0].upper() + simple[1:] + ".",
            "prompt": complex_prompt(rng, subject, scene, long),
            "category": cat,
        })
    with open(os.path.join(out, "metadata.jsonl"), "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=64)
    a = ap.parse_args(argv)
    recs = build(a.out, a.seed, a.rows)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(a.out) for f in fs)
    print(f"wrote {len(recs)} rows to {a.out} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
