"""The procedural toy world's contents: seven kinds of toy in seven scenes, their attributes and captions.

Every picture is a function of a seed: ``sample_toy(rng)`` draws the attributes (class, colours,
parts, scene, pose, scale, position, light), ``render.render(toy)`` paints them, ``captions(toy)`` says
them in words. The world is what the embedded tiny SDXL is pretrained on, and what its judge learns to read.

The sample subject ``datasets/sks_toy`` is a teal robot with a red heart on its chest (yellow eye,
orange antenna ball). The world has teal robots and robots with hearts, but never a teal robot with a
heart (``is_subject``): the base model cannot draw the subject, so DreamBooth has something to learn.
Robots are the most common class, so the class prompt "a photo of a toy" knows them well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Class -> how often it is drawn (robots most: they are the subject's class).
CLASSES: dict[str, float] = {
    "robot": 0.28,
    "duck": 0.12,
    "car": 0.12,
    "teddy": 0.12,
    "rocket": 0.12,
    "ball": 0.12,
    "block": 0.12,
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 48),
    "orange": (250, 128, 24),
    "yellow": (250, 206, 40),
    "green": (60, 170, 60),
    "teal": (32, 168, 160),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 120, 170),
}
EYE_COLOURS = ("yellow", "white", "red", "blue", "green")
SYMBOLS = ("heart", "star", "square", "circle", "none")
ANTENNA_COLOURS = ("orange", "red", "yellow", "blue", "green")
SCENES: dict[str, str] = {  # scene -> its words in a caption
    "wood": "on a wooden table",
    "checker": "on a checkered floor",
    "grass": "on the grass",
    "carpet": "on a carpet",
    "studio": "in a studio",
    "beach": "on the beach",
    "snow": "in the snow",
}


@dataclass(frozen=True)
class Toy:
    """One picture of the world: what is in it and how it is framed."""

    kind: str  # a key of CLASSES
    colour: str  # body colour, a key of COLOURS
    scene: str  # a key of SCENES
    eye: str = "yellow"  # robots: eye colour
    symbol: str = "none"  # robots: chest symbol
    antenna: str = "orange"  # robots: antenna ball colour
    accent: str = "white"  # second colour: the ball's stripe, the rocket's fins and window, the car's roof
    height: float = 0.6  # toy height as a fraction of the picture
    x: float = 0.5  # centre, fraction of the width
    y: float = 0.85  # where it stands, fraction of the height
    yaw: float = 0.0  # -1..1: face features slide sideways
    mirror: bool = False
    light: float = -0.6  # light from the left (<0) or right (>0)
    seed: int = 0  # texture and noise

    def attributes(self) -> dict[str, Any]:
        return asdict(self)


SUBJECT = Toy("robot", "teal", "studio", eye="yellow", symbol="heart", antenna="orange")


def is_subject(kind: str, colour: str, symbol: str) -> bool:
    """The combination the world leaves out: a teal robot with a heart on its chest."""
    return kind == "robot" and colour == "teal" and symbol == "heart"


def sample_toy(rng: np.random.Generator, *, kind: str | None = None, allow_subject: bool = False) -> Toy:
    """Draw one toy and its framing; never the sample subject unless ``allow_subject`` (the judge's
    extra renders: it must know the combination the model was never shown). ``kind`` fixes the class."""
    kinds = list(CLASSES)
    p = np.array(list(CLASSES.values()))
    while True:
        pick = kind or kinds[rng.choice(len(kinds), p=p / p.sum())]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        symbol = SYMBOLS[rng.integers(len(SYMBOLS))] if pick == "robot" else "none"
        if allow_subject or not is_subject(pick, colour, symbol):
            kind = pick
            break
    accent = colour
    while accent == colour:
        accent = ([*COLOURS, "white"])[rng.integers(len(COLOURS) + 1)]
    height = float(rng.uniform(0.35, 0.8))
    return Toy(
        kind=kind,
        colour=colour,
        scene=list(SCENES)[rng.integers(len(SCENES))],
        eye=EYE_COLOURS[rng.integers(len(EYE_COLOURS))],
        symbol=symbol,
        antenna=ANTENNA_COLOURS[rng.integers(len(ANTENNA_COLOURS))],
        accent=accent,
        height=height,
        x=float(rng.uniform(0.3, 0.7)),
        y=float(rng.uniform(0.78, 0.95)),
        yaw=float(rng.uniform(-1, 1)),
        mirror=bool(rng.integers(2)),
        light=float(rng.uniform(-1, 1)),
        seed=int(rng.integers(2**31)),
    )


# ------------------------------------------------------------------------------------ captions


def captions(toy: Toy) -> list[str]:
    """The ways this picture may be described, most detailed first (training picks one per step)."""
    name = f"toy {toy.kind}" if toy.kind != "teddy" else "teddy bear"
    where = SCENES[toy.scene]
    colour = toy.colour
    out = [f"a photo of a {colour} {name} {where}", f"a {colour} {name} {where}"]
    if toy.kind == "robot" and toy.symbol != "none":
        out.insert(0, f"a photo of a {colour} {name} with a {toy.symbol} {where}")
    out += [
        f"a photo of a {name} {where}",
        f"a photo of a {colour} {name}",
        f"a photo of a {name}",
        f"a photo of a toy {where}",
        f"a toy {where}",
        "a photo of a toy",
    ]
    return out
