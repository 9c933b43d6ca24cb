"""Drawing the toy world with Pillow and numpy: ``render(toy)`` paints a ``toys.Toy`` in its scene.

Each part is a PIL shape painted three times (a dark rim, the body colour shifted toward the
light, a small highlight), which reads as moulded plastic at 64 px and costs about a millisecond.
Pictures are drawn at twice the size and downsampled (anti-aliased edges). The toys, their sampling
and captions are ``toys``'; their names are re-exported here.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .toys import CLASSES, COLOURS, EYE_COLOURS, SCENES, SUBJECT, SYMBOLS, Toy, captions, is_subject, sample_toy

__all__ = [
    "CLASSES",
    "COLOURS",
    "EYE_COLOURS",
    "SCENES",
    "SYMBOLS",
    "Toy",
    "captions",
    "is_subject",
    "render",
    "sample_toy",
    "SUBJECT",
]

WHITE = (240, 240, 236)
GREY = (150, 156, 164)
DARK = (40, 44, 54)

SIZE = 64
SUPERSAMPLE = 2


# ------------------------------------------------------------------------------------ drawing


def _rgb(name: str) -> tuple[int, int, int]:
    return WHITE if name == "white" else COLOURS[name]


def _tone(colour: tuple[int, int, int], k: float) -> tuple[int, int, int]:
    """Darker (k < 1) or lighter (k > 1, toward white) version of a colour."""
    if k <= 1:
        return tuple(int(c * k) for c in colour)  # type: ignore[return-value]
    return tuple(int(c + (255 - c) * (k - 1)) for c in colour)  # type: ignore[return-value]


class _Painter:
    """Paints parts in toy units (height 1, origin at the toy's top centre) onto an RGBA canvas."""

    def __init__(self, canvas: Image.Image, cx: float, top: float, scale: float, light: float, mirror: bool):
        self.draw = ImageDraw.Draw(canvas)
        self.cx, self.top, self.s, self.light, self.flip = cx, top, scale, light, -1.0 if mirror else 1.0

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.flip * x * self.s, self.top + y * self.s

    def _box(self, x0, y0, x1, y1, grow: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)):
        (a, b), (c, d) = self.xy(x0, y0), self.xy(x1, y1)
        a, c = min(a, c), max(a, c)
        g = grow * self.s
        return [a - g + shift[0], b - g + shift[1], c + g + shift[0], d + g + shift[1]]

    def shaded(self, shape: str, box, colour, radius: float = 0.0) -> None:
        """Rim, lit body, highlight: three fills of the same shape (ellipse or rounded rectangle)."""
        colour = tuple(colour)
        w = (box[2] - box[0]) * self.s
        lit = (self.light * 0.06 * w, -0.05 * w)
        for grow, shift, tone in ((0.0, (0, 0), 0.7), (-0.18, lit, 1.0), (-0.4, (2 * lit[0], 2 * lit[1]), 1.35)):
            if tone > 1.2 and w < 6:  # no highlight on tiny parts
                continue
            b = self._box(*box, grow=grow * (box[2] - box[0]) / 2, shift=shift)
            if b[2] - b[0] < 1 or b[3] - b[1] < 1:
                continue
            fill = _tone(colour, tone)
            if shape == "ellipse":
                self.draw.ellipse(b, fill=fill)
            else:
                self.draw.rounded_rectangle(b, radius=max(0.0, radius * self.s * (1 + grow)), fill=fill)

    def circle(self, x, y, r, colour, flat: bool = False) -> None:
        box = (x - r, y - r, x + r, y + r)
        if flat:
            self.draw.ellipse(self._box(*box), fill=tuple(colour))
        else:
            self.shaded("ellipse", box, colour)

    def rect(self, x0, y0, x1, y1, colour, radius=0.02, flat: bool = False) -> None:
        if flat:
            self.draw.rounded_rectangle(self._box(x0, y0, x1, y1), radius=radius * self.s, fill=tuple(colour))
        else:
            self.shaded("rect", (x0, y0, x1, y1), colour, radius)

    def polygon(self, points, colour) -> None:
        self.draw.polygon([self.xy(x, y) for x, y in points], fill=tuple(colour))

    def line(self, x0, y0, x1, y1, width, colour) -> None:
        self.draw.line([self.xy(x0, y0), self.xy(x1, y1)], fill=tuple(colour), width=max(1, int(width * self.s)))

    def symbol(self, kind: str, x: float, y: float, size: float, colour) -> None:
        if kind == "heart":
            for side in (-1, 1):
                self.circle(x + side * 0.25 * size, y - 0.12 * size, 0.28 * size, colour, flat=True)
            self.polygon(
                [(x - 0.52 * size, y - 0.02 * size), (x + 0.52 * size, y - 0.02 * size), (x, y + 0.6 * size)], colour
            )
        elif kind == "star":
            pts = []
            for i in range(10):
                r = size * (0.6 if i % 2 == 0 else 0.25)
                a = -math.pi / 2 + i * math.pi / 5
                pts.append((x + r * math.cos(a), y + r * math.sin(a)))
            self.polygon(pts, colour)
        elif kind == "square":
            self.rect(x - 0.4 * size, y - 0.4 * size, x + 0.4 * size, y + 0.4 * size, colour, 0.0, flat=True)
        elif kind == "circle":
            self.circle(x, y, 0.45 * size, colour, flat=True)


def _draw_robot(p: _Painter, toy: Toy) -> None:
    """The sample subject's build (datasets/render_sample_subject.py), with its colours as attributes."""
    body, dark = COLOURS[toy.colour], _tone(COLOURS[toy.colour], 0.78)
    face, chest = 0.07 * toy.yaw, 0.05 * toy.yaw
    p.line(-0.19, 0.60, -0.29, 0.74, 0.08, dark)  # arms
    p.line(0.19, 0.60, 0.29, 0.74, 0.08, dark)
    p.circle(-0.295, 0.76, 0.045, GREY)  # hands
    p.circle(0.295, 0.76, 0.045, GREY)
    p.rect(-0.14, 0.83, -0.05, 0.95, dark)  # legs
    p.rect(0.05, 0.83, 0.14, 0.95, dark)
    p.rect(-0.175, 0.925, -0.025, 1.0, (62, 66, 78), 0.03)  # feet
    p.rect(0.025, 0.925, 0.175, 1.0, (62, 66, 78), 0.03)
    p.rect(-0.205, 0.53, 0.205, 0.87, body, 0.075)  # body
    if toy.symbol != "none":
        colour = (214, 30, 48) if toy.symbol == "heart" else _tone(body, 1.6)
        if toy.symbol != "heart" and toy.colour in ("yellow", "pink", "orange"):
            colour = _tone(body, 0.45)
        p.symbol(toy.symbol, chest, 0.665, 0.13, colour)
    p.rect(-0.05, 0.48, 0.05, 0.56, GREY)  # neck
    p.line(face * 0.6, 0.095, face * 0.6, 0.17, 0.02, GREY)  # antenna
    p.circle(-0.185 + face * 0.5, 0.33, 0.045, GREY)  # ear bolts
    p.circle(0.185 + face * 0.5, 0.33, 0.045, GREY)
    p.circle(0.0, 0.33, 0.18, body)  # head
    p.circle(face * 0.6, 0.06, 0.05, COLOURS.get(toy.antenna, WHITE))  # antenna ball
    p.circle(face, 0.32, 0.105, DARK, flat=True)  # eye bezel
    p.circle(face, 0.32, 0.082, _rgb(toy.eye))  # the big eye
    p.circle(face * 1.15, 0.325, 0.034, (20, 20, 26), flat=True)  # pupil
    p.rect(face - 0.045, 0.445, face + 0.045, 0.462, DARK, 0.008, flat=True)  # mouth slot


def _draw_duck(p: _Painter, toy: Toy) -> None:
    body = COLOURS[toy.colour]
    f = 0.08 * toy.yaw
    p.shaded("ellipse", (-0.45, 0.5, 0.4, 1.0), body)  # body
    p.polygon([(-0.45, 0.62), (-0.6, 0.5), (-0.42, 0.75)], _tone(body, 0.8))  # tail
    p.circle(0.12 + f, 0.33, 0.22, body)  # head
    beak = (250, 140, 20) if toy.colour != "orange" else (250, 206, 40)
    p.rect(0.3 + f, 0.34, 0.52 + f, 0.44, beak, 0.05)
    p.circle(0.2 + f, 0.28, 0.04, (20, 20, 26), flat=True)  # eye
    p.shaded("ellipse", (-0.22, 0.62, 0.18, 0.86), _tone(body, 0.85))  # wing


def _draw_car(p: _Painter, toy: Toy) -> None:
    body, roof = COLOURS[toy.colour], _rgb(toy.accent)
    p.rect(-0.3, 0.25, 0.3, 0.55, roof, 0.08)  # cabin
    p.rect(-0.22, 0.31, -0.03, 0.5, (170, 210, 240), 0.03, flat=True)  # windows
    p.rect(0.03, 0.31, 0.22, 0.5, (170, 210, 240), 0.03, flat=True)
    p.rect(-0.55, 0.48, 0.55, 0.85, body, 0.1)  # body
    p.circle(0.5, 0.6, 0.04, (255, 240, 160), flat=True)  # headlight
    for x in (-0.32, 0.32):  # wheels
        p.circle(x, 0.85, 0.15, (30, 30, 36))
        p.circle(x, 0.85, 0.06, GREY, flat=True)


def _draw_teddy(p: _Painter, toy: Toy) -> None:
    fur = COLOURS[toy.colour]
    snout = _tone(fur, 1.45)
    f = 0.06 * toy.yaw
    for x in (-0.22, 0.22):
        p.circle(x, 0.86, 0.12, fur)  # feet
        p.circle(x * 1.55, 0.6, 0.1, fur)  # arms
    p.shaded("ellipse", (-0.28, 0.45, 0.28, 0.95), fur)  # body
    p.shaded("ellipse", (-0.15, 0.58, 0.15, 0.85), snout)  # belly
    for x in (-0.2, 0.2):
        p.circle(x + f, 0.1, 0.09, fur)  # ears
    p.circle(f, 0.27, 0.22, fur)  # head
    p.shaded("ellipse", (-0.09 + 1.3 * f, 0.29, 0.09 + 1.3 * f, 0.42), snout)
    p.circle(1.3 * f, 0.31, 0.035, (30, 20, 20), flat=True)  # nose
    for x in (-0.09, 0.09):
        p.circle(x + 1.2 * f, 0.22, 0.03, (20, 20, 26), flat=True)  # eyes


def _draw_rocket(p: _Painter, toy: Toy) -> None:
    body, fins = COLOURS[toy.colour], _rgb(toy.accent)
    p.polygon([(-0.18, 0.65), (-0.36, 0.98), (-0.14, 0.9)], fins)  # fins
    p.polygon([(0.18, 0.65), (0.36, 0.98), (0.14, 0.9)], fins)
    p.rect(-0.18, 0.25, 0.18, 0.92, body, 0.12)  # body
    p.polygon([(-0.17, 0.3), (0.0, 0.0), (0.17, 0.3)], fins)  # nose cone
    p.circle(0.0, 0.45, 0.09, (40, 44, 54), flat=True)  # window
    p.circle(0.0, 0.45, 0.065, (170, 210, 240))
    p.rect(-0.08, 0.92, 0.08, 1.0, GREY, 0.02)  # nozzle


def _draw_ball(p: _Painter, toy: Toy) -> None:
    body, stripe = COLOURS[toy.colour], _rgb(toy.accent)
    p.circle(0.0, 0.5, 0.5, body)
    p.rect(-0.49, 0.43, 0.49, 0.57, stripe, 0.0, flat=True)
    p.circle(-0.16 * (1 if p.light < 0 else -1), 0.32, 0.1, _tone(body, 1.5), flat=True)  # shine


def _draw_block(p: _Painter, toy: Toy) -> None:
    body = COLOURS[toy.colour]
    d = 0.2
    p.polygon([(-0.4, 0.2 + d), (-0.4 + d, 0.2), (0.4 + d, 0.2), (0.4, 0.2 + d)], _tone(body, 1.3))  # top
    p.polygon([(0.4, 0.2 + d), (0.4 + d, 0.2), (0.4 + d, 1.0 - d), (0.4, 1.0)], _tone(body, 0.7))  # side
    p.rect(-0.4, 0.2 + d, 0.4, 1.0, body, 0.0)  # front
    p.rect(-0.18, 0.52, 0.18, 0.88, _rgb(toy.accent), 0.03, flat=True)  # letter plate


_DRAW = {
    "robot": _draw_robot,
    "duck": _draw_duck,
    "car": _draw_car,
    "teddy": _draw_teddy,
    "rocket": _draw_rocket,
    "ball": _draw_ball,
    "block": _draw_block,
}
_ASPECT = {"robot": 0.86, "duck": 1.2, "car": 1.3, "teddy": 0.8, "rocket": 0.75, "ball": 1.0, "block": 1.0}


# ------------------------------------------------------------------------------------ scenes


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0


def _gradient(size: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rgb = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(rgb / 255.0, (size, size, 3)).copy()


def _scene(kind: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Background RGB in [0, 1] and the row of its horizon."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    noise = _noise(rng, size, 6)
    horizon = int(size * rng.uniform(0.42, 0.6))
    below = ys > horizon
    z = np.where(below, 0.45 * size / np.maximum(ys - horizon, 1.0), 0.0)  # depth on the floor
    u = (xs - size / 2) * z / (0.45 * size)
    if kind == "wood":
        img = _gradient(size, (205, 195, 180), (225, 215, 200))
        grain = 0.5 + 0.5 * np.sin(25 * z + 3 * u + 5 * _noise(rng, size, 10)) / (1 + 0.5 * z)
        floor = np.stack([0.62 + 0.1 * grain, 0.42 + 0.07 * grain, 0.25 + 0.04 * grain], -1)
    elif kind == "checker":
        img = _gradient(size, (40, 50, 90), (70, 80, 130))
        check = (np.floor(u * 4) + np.floor(z * 4)) % 2
        floor = np.where(check[..., None] > 0, [0.88, 0.87, 0.83], [0.15, 0.16, 0.2]).astype(np.float32)
    elif kind == "grass":
        img = _gradient(size, (110, 170, 235), (190, 220, 245))
        blades = _noise(rng, size, 40)
        floor = np.stack([0.2 + 0.15 * blades, 0.5 + 0.22 * blades, 0.15 + 0.1 * noise], -1)
    elif kind == "carpet":
        img = _gradient(size, (235, 220, 190), (220, 200, 170))
        fibres = rng.random((size, size)).astype(np.float32)
        floor = np.stack([0.62 + 0.08 * fibres, 0.2 + 0.06 * fibres, 0.25 + 0.06 * fibres], -1) * (
            0.85 + 0.3 * noise[..., None]
        )
    elif kind == "studio":
        spot = np.exp(-(((xs - 0.5 * size) / (0.5 * size)) ** 2 + ((ys - 0.45 * size) / (0.5 * size)) ** 2))
        img = _gradient(size, (200, 200, 204), (150, 150, 156)) * (0.8 + 0.3 * spot[..., None])
        return np.clip(img, 0, 1), size  # a seamless backdrop: no floor line
    elif kind == "beach":
        img = _gradient(size, (90, 160, 235), (170, 210, 245))
        sea = (ys > horizon - 0.12 * size) & ~below
        img[sea] = (np.array([0.15, 0.45, 0.7]) * (0.9 + 0.2 * noise[..., None]))[sea]
        floor = np.stack([0.9 + 0.05 * noise, 0.8 + 0.05 * noise, 0.55 + 0.05 * noise], -1)
    elif kind == "snow":
        img = _gradient(size, (150, 160, 175), (200, 205, 215))
        floor = np.stack([0.93 + 0.05 * noise] * 2 + [0.97 + 0.03 * noise], -1)
    else:
        raise ValueError(f"unknown scene {kind!r}")
    img[below] = floor[below]
    return np.clip(img, 0, 1), horizon


def render(toy: Toy, size: int = SIZE) -> Image.Image:
    """Paint ``toy`` in its scene: an RGB image of ``size`` x ``size``."""
    rng = np.random.default_rng(toy.seed)
    big = size * SUPERSAMPLE
    background, _ = _scene(toy.scene, big, rng)
    canvas = Image.fromarray((background * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    scale = toy.height * big
    cx, feet = toy.x * big, toy.y * big
    top = feet - scale
    # Cast shadow under the toy, leaning away from the light.
    half_width = 0.5 * _ASPECT[toy.kind] * scale
    shadow = Image.new("L", (big, big), 0)
    ImageDraw.Draw(shadow).ellipse(
        [
            cx - half_width - toy.light * 0.1 * scale,
            feet - 0.05 * scale,
            cx + half_width - toy.light * 0.3 * scale,
            feet + 0.05 * scale,
        ],
        fill=110,
    )
    shadow = shadow.filter(ImageFilter.GaussianBlur(0.03 * scale + 1))
    canvas = Image.composite(Image.new("RGB", (big, big), (0, 0, 0)), canvas, shadow)
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _DRAW[toy.kind](_Painter(layer, cx, top, scale, toy.light, toy.mirror), toy)
    canvas.paste(layer, (0, 0), layer)
    img = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), np.float32) / 255.0
    img = img + rng.normal(0.0, 0.01, img.shape).astype(np.float32)  # sensor noise
    return Image.fromarray((np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8))
