"""Render the sample subject in ``datasets/sks_toy/``: a teal toy robot, photographed seven times.

The robot: a round teal head with one big yellow eye in a dark bezel, an orange ball on a short
antenna, grey ear bolts, a rounded teal body with a red heart on the chest, stubby arms with grey
hands, short legs and dark feet. Every picture shows the same robot with a different pose (yaw,
tilt, mirror), scale, light direction and scene (wall colour, floor texture, props).

Everything is drawn with PIL and numpy from a fixed seed, so running this script reproduces the
files byte for byte (for a given Pillow/numpy version; the JPEG encoder is Pillow's libjpeg):

    .venv/bin/python datasets/render_sample_subject.py

Shading: each part of the robot is a flat PIL mask; a blurred copy of the mask serves as a height
map, its gradient as a surface normal, and a Lambert + Blinn-Phong model lights it, which gives the
soft "moulded plastic" look. Drop shadows between parts, a cast shadow on the floor, depth-of-field
blur on the background, a vignette and sensor noise make it read as a photo rather than clipart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT_DIR = Path(__file__).resolve().parent / "sks_toy"
SEED = 20240611
SUPERSAMPLE = 2  # the robot is drawn at 2x and downsampled: anti-aliased edges

# Robot colours (RGB, 0-255) and surface finish: (colour, specular strength, shininess).
TEAL = (32, 168, 160)
TEAL_DARK = (22, 132, 128)
GREY = (150, 156, 164)
DARK = (40, 44, 54)
YELLOW = (255, 206, 36)
ORANGE = (255, 128, 24)
RED = (214, 30, 48)
FEET = (62, 66, 78)

Array = np.ndarray


# ---------------------------------------------------------------- shading helpers
def _mask(size: tuple[int, int], draw_fn) -> Array:
    """A float mask in [0, 1] of the shape that ``draw_fn(ImageDraw)`` paints in white."""
    img = Image.new("L", size, 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float32) / 255.0


def _blur(a: Array, sigma: float) -> Array:
    """Gaussian-like blur in float32 (three box blurs per axis): smooth enough to differentiate."""
    r = max(1, int(round((np.sqrt(4.0 * sigma * sigma + 1.0) - 1.0) / 2.0)))  # 3 boxes of 2r+1 ~ sigma
    out = a.astype(np.float32)
    for axis in (0, 1):
        for _ in range(3):
            pad = [(0, 0), (0, 0)]
            pad[axis] = (r + 1, r)
            c = np.cumsum(np.pad(out, pad, mode="edge"), axis=axis, dtype=np.float64)
            hi = np.take(c, np.arange(2 * r + 1, c.shape[axis]), axis=axis)
            lo = np.take(c, np.arange(0, c.shape[axis] - 2 * r - 1), axis=axis)
            out = ((hi - lo) / (2 * r + 1)).astype(np.float32)
    return out


def _shade(mask: Array, colour, light: Array, roundness: float, spec: float, shininess: float) -> Array:
    """Light a flat mask as a rounded plastic part: blurred mask = height map, gradient = normal."""
    height = _blur(mask, roundness)
    gy, gx = np.gradient(height)
    k = 1.6 * roundness
    normal = np.stack([-gx * k, -gy * k, np.ones_like(height)], axis=-1)
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    half = light + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    diffuse = np.clip(normal @ light, 0.0, 1.0)
    highlight = np.clip(normal @ half, 0.0, 1.0) ** shininess
    base = np.asarray(colour, dtype=np.float32) / 255.0
    rgb = base * (0.38 + 0.72 * diffuse[..., None]) + spec * highlight[..., None]
    return np.clip(rgb, 0.0, 1.0)


@dataclass
class Layer:
    """A straight-alpha RGBA layer (float arrays in [0, 1]), painted back to front."""

    rgb: Array
    alpha: Array

    def paint(self, box: tuple[slice, slice], mask: Array, rgb: Array,
              shadow_offset: tuple[float, float] | None = None) -> None:
        """Paint ``rgb`` through ``mask`` into the window ``box`` of the layer."""
        dst_rgb, dst_alpha = self.rgb[box], self.alpha[box]
        if shadow_offset is not None:  # soft shadow of this part on what is already painted
            dx, dy = shadow_offset
            shadow = np.roll(_blur(mask, 6.0 * SUPERSAMPLE), (int(dy), int(dx)), axis=(0, 1))
            dst_rgb *= 1.0 - 0.35 * shadow[..., None] * dst_alpha[..., None]
        m = mask[..., None]
        dst_rgb[:] = dst_rgb * (1.0 - m) + rgb * m
        dst_alpha[:] = dst_alpha * (1.0 - mask) + mask


# ---------------------------------------------------------------- the robot
def render_robot(height_px: int, yaw: float, light: tuple[float, float]) -> Image.Image:
    """The robot as an RGBA image whose feet touch the bottom edge; ``yaw`` in [-1, 1] turns it."""
    s = height_px * SUPERSAMPLE
    w, h = int(0.86 * s), int(1.04 * s)
    cx = w / 2
    lvec = np.array([light[0], light[1], 0.85])
    lvec /= np.linalg.norm(lvec)
    drop = (-light[0] * 0.02 * s, -light[1] * 0.02 * s)  # shadows fall away from the light
    layer = Layer(np.zeros((h, w, 3), np.float32), np.zeros((h, w), np.float32))

    def u(x: float, y: float) -> tuple[float, float]:  # robot units (height 1) -> pixels
        return cx + x * s, (y + 0.03) * s

    def circle(x: float, y: float, r: float):
        (px, py), pr = u(x, y), r * s
        return lambda d: d.ellipse([px - pr, py - pr, px + pr, py + pr], fill=255)

    def rrect(x0: float, y0: float, x1: float, y1: float, r: float):
        return lambda d: d.rounded_rectangle([*u(x0, y0), *u(x1, y1)], radius=r * s, fill=255)

    def capsule(x0: float, y0: float, x1: float, y1: float, width: float):
        def draw(d):
            d.line([u(x0, y0), u(x1, y1)], fill=255, width=int(width * s))
            for x, y in ((x0, y0), (x1, y1)):
                circle(x, y, width / 2)(d)
        return draw

    def heart(x: float, y: float, size: float):
        def draw(d):
            for side in (-1, 1):
                circle(x + side * 0.25 * size, y - 0.12 * size, 0.28 * size)(d)
            d.polygon([u(x - 0.52 * size, y - 0.02 * size), u(x + 0.52 * size, y - 0.02 * size),
                       u(x, y + 0.6 * size)], fill=255)
        return draw

    def part(shape, colour, roundness: float, spec=0.45, shininess=30.0, shadow=False) -> None:
        mask = _mask((w, h), shape)
        ys, xs = np.nonzero(mask)
        pad = int(4 * roundness * s + 0.05 * s)  # room for the blur and the drop shadow
        box = (slice(max(0, ys.min() - pad), ys.max() + pad + 1), slice(max(0, xs.min() - pad), xs.max() + pad + 1))
        rgb = _shade(mask[box], colour, lvec, roundness * s, spec, shininess)
        layer.paint(box, mask[box], rgb, drop if shadow else None)

    face = 0.07 * yaw  # how far the face features slide when the robot turns
    chest = 0.05 * yaw
    # back to front
    part(capsule(-0.19, 0.60, -0.29, 0.74, 0.08), TEAL_DARK, 0.03)          # arms
    part(capsule(0.19, 0.60, 0.29, 0.74, 0.08), TEAL_DARK, 0.03)
    part(circle(-0.295, 0.76, 0.045), GREY, 0.02, spec=0.7)                  # hands
    part(circle(0.295, 0.76, 0.045), GREY, 0.02, spec=0.7)
    part(rrect(-0.14, 0.83, -0.05, 0.95, 0.02), TEAL_DARK, 0.02)             # legs
    part(rrect(0.05, 0.83, 0.14, 0.95, 0.02), TEAL_DARK, 0.02)
    part(rrect(-0.175, 0.925, -0.025, 1.0, 0.03), FEET, 0.02, spec=0.25)     # feet
    part(rrect(0.025, 0.925, 0.175, 1.0, 0.03), FEET, 0.02, spec=0.25)
    part(rrect(-0.205, 0.53, 0.205, 0.87, 0.075), TEAL, 0.06, shadow=True)   # body
    part(heart(chest, 0.665, 0.13), RED, 0.025, spec=0.6, shadow=True)      # chest heart
    part(rrect(-0.05, 0.48, 0.05, 0.56, 0.02), GREY, 0.02, spec=0.7)         # neck
    part(capsule(face * 0.6, 0.095, face * 0.6, 0.17, 0.02), GREY, 0.008, spec=0.8)  # antenna
    part(circle(-0.185 + face * 0.5, 0.33, 0.045), GREY, 0.015, spec=0.7)    # ear bolts
    part(circle(0.185 + face * 0.5, 0.33, 0.045), GREY, 0.015, spec=0.7)
    part(circle(0.0, 0.33, 0.18), TEAL, 0.09, shadow=True)                  # head
    part(circle(face * 0.6, 0.06, 0.05), ORANGE, 0.025, spec=0.6, shadow=True)  # antenna ball
    part(circle(face, 0.32, 0.105), DARK, 0.02, spec=0.5, shadow=True)        # eye bezel
    part(circle(face, 0.32, 0.082), YELLOW, 0.035, spec=0.6)                 # the big eye
    part(circle(face * 1.15, 0.325, 0.034), (20, 20, 26), 0.01, spec=0.2)    # pupil
    part(circle(face - 0.03, 0.29, 0.016), (255, 255, 255), 0.005, spec=0.0)  # catch light
    part(rrect(face - 0.045, 0.445, face + 0.045, 0.462, 0.008), DARK, 0.005, spec=0.2)  # mouth slot

    rgba = np.dstack([layer.rgb, layer.alpha])
    img = Image.fromarray((np.clip(rgba, 0, 1) * 255 + 0.5).astype(np.uint8), "RGBA")
    return img.resize((w // SUPERSAMPLE, h // SUPERSAMPLE), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- scenes
def _value_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> Array:
    """Smooth noise in [0, 1]: a coarse random grid upsampled bicubically."""
    coarse = Image.fromarray((rng.random((cells, cells)) * 255).astype(np.uint8))
    return np.asarray(coarse.resize((shape[1], shape[0]), Image.Resampling.BICUBIC), np.float32) / 255.0


def _vertical_gradient(h: int, w: int, top, bottom) -> Array:
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    rgb = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(rgb / 255.0, (h, w, 3)).copy()


def _box_mask(w: int, h: int, box: tuple[float, float, float, float], ellipse: bool = False) -> Array:
    """A rectangle (or ellipse) mask; ``box`` is (x0, y0, x1, y1) in fractions of the image size."""
    xy = [int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)]
    return _mask((w, h), lambda d: (d.ellipse if ellipse else d.rectangle)(xy, fill=255))


def _over(img: Array, mask: Array, rgb: Array) -> Array:
    """``rgb`` painted over ``img`` through ``mask``."""
    return img * (1 - mask[..., None]) + rgb * mask[..., None]


def _floor_coords(h: int, w: int, horizon: int) -> tuple[Array, Array, Array]:
    """Perspective floor coordinates below ``horizon``: lateral u, depth z, and the floor mask."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    below = ys > horizon
    z = np.where(below, 0.45 * h / np.maximum(ys - horizon, 1.0), 0.0)
    u = (xs - w / 2) * z / (0.45 * h)
    return u, z, below


@dataclass(frozen=True)
class Shot:
    """One photograph: image size, scene, robot pose, light and framing."""

    name: str
    size: tuple[int, int]        # (width, height)
    scene: str
    robot_height: float          # fraction of image height
    centre_x: float              # fraction of image width
    feet_y: float                # fraction of image height where the feet stand
    yaw: float = 0.0
    tilt: float = 0.0            # degrees, counter-clockwise
    mirror: bool = False
    light: tuple[float, float] = (-0.6, -0.7)
    white_balance: tuple[float, float, float] = (1.0, 1.0, 1.0)


SHOTS = [
    Shot("robot_01_wood_table", (640, 640), "wood", 0.62, 0.50, 0.86),
    Shot("robot_02_checker_floor", (768, 640), "checker", 0.52, 0.40, 0.84, yaw=0.7, light=(0.5, -0.8),
         white_balance=(0.97, 1.0, 1.05)),
    Shot("robot_03_closeup_pink", (640, 768), "pink_shelf", 1.15, 0.52, 1.22, yaw=-0.3, tilt=6.0),
    Shot("robot_04_grass", (832, 640), "grass", 0.45, 0.62, 0.88, yaw=-0.6, mirror=True,
         light=(-0.3, -0.9), white_balance=(1.04, 1.0, 0.93)),
    Shot("robot_05_studio_tilted", (704, 704), "studio", 0.66, 0.48, 0.85, tilt=-14.0, light=(0.7, -0.5)),
    Shot("robot_06_carpet_small", (768, 768), "carpet", 0.34, 0.36, 0.80, yaw=0.4, mirror=True),
    Shot("robot_07_window_floorboards", (640, 832), "floorboards", 0.58, 0.46, 0.90, yaw=0.9,
         tilt=4.0, light=(-0.8, -0.4), white_balance=(1.03, 1.0, 0.95)),
]


def render_scene(kind: str, w: int, h: int, rng: np.random.Generator) -> tuple[Array, float]:
    """Background RGB in [0, 1] and the depth-of-field blur radius that suits it."""
    noise = _value_noise(rng, (h, w), 9)
    if kind == "wood":
        img = _vertical_gradient(h, w, (170, 200, 230), (210, 225, 240))
        u, z, floor = _floor_coords(h, w, int(0.62 * h))
        # grain runs across the picture and fades with distance (no moire at the horizon)
        grain = 0.5 + 0.5 * np.sin(25 * z + 3 * u + 5 * _value_noise(rng, (h, w), 14)) / (1 + 0.5 * z)
        plank = (np.floor(z * 1.5) % 2) * 0.05
        wood = np.stack([0.62 + 0.1 * grain - plank, 0.43 + 0.07 * grain - plank, 0.26 + 0.04 * grain - plank], -1)
        img[floor] = wood[floor]
        return img, 2.0
    if kind == "checker":
        img = _vertical_gradient(h, w, (30, 40, 80), (60, 70, 120))
        u, z, floor = _floor_coords(h, w, int(0.55 * h))
        check = (np.floor(u * 4) + np.floor(z * 4)) % 2
        tiles = np.where(check[..., None] > 0, [0.85, 0.84, 0.80], [0.18, 0.2, 0.26])
        fade = np.clip(1.4 - 0.35 * z, 0.5, 1.0)[..., None]  # far tiles fade into haze
        img[floor] = (tiles * fade + 0.25 * (1 - fade))[floor]
        return img, 2.5
    if kind == "pink_shelf":
        img = _vertical_gradient(h, w, (240, 170, 190), (225, 140, 165))
        shelf = int(0.78 * h)
        img[shelf:] = np.asarray([0.95, 0.94, 0.92])
        img[shelf:shelf + 6] *= 0.8
        block = _box_mask(w, h, (0.04, 0.58, 0.24, 0.78))
        img = _over(img, block, np.array([0.98, 0.82, 0.15]) * (0.8 + 0.2 * noise[..., None]))
        return img, 4.0
    if kind == "grass":
        img = _vertical_gradient(h, w, (120, 180, 240), (200, 225, 245))
        u, z, floor = _floor_coords(h, w, int(0.5 * h))
        blades = _value_noise(rng, (h, w), 120)
        grass = np.stack([0.22 + 0.15 * blades, 0.5 + 0.25 * blades, 0.16 + 0.1 * noise], -1)
        img[floor] = grass[floor]
        ball = _box_mask(w, h, (0.08, 0.66, 0.25, 0.88), ellipse=True)
        img = _over(img, ball, _shade(ball, (230, 60, 60), np.array([-0.4, -0.8, 0.6]) / 1.07, 30.0, 0.5, 30.0))
        return img, 3.0
    if kind == "studio":
        img = _vertical_gradient(h, w, (200, 200, 204), (150, 150, 156))
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        spot = np.exp(-(((xs - 0.55 * w) / (0.5 * w)) ** 2 + ((ys - 0.45 * h) / (0.5 * h)) ** 2))
        return img * (0.8 + 0.3 * spot[..., None]), 1.0
    if kind == "carpet":
        img = _vertical_gradient(h, w, (235, 220, 190), (220, 200, 170))
        u, z, floor = _floor_coords(h, w, int(0.45 * h))
        fibres = rng.random((h, w)).astype(np.float32)
        carpet = np.stack([0.45 + 0.08 * fibres, 0.45 + 0.08 * fibres, 0.5 + 0.08 * fibres], -1)
        carpet *= 0.85 + 0.3 * noise[..., None]
        img[floor] = carpet[floor]
        cube = _box_mask(w, h, (0.66, 0.52, 0.86, 0.72))
        img = _over(img, cube, _shade(cube, (60, 90, 220), np.array([-0.5, -0.6, 0.6]), 8.0, 0.3, 20.0))
        return img, 2.0
    if kind == "floorboards":
        img = _vertical_gradient(h, w, (190, 170, 215), (160, 140, 190))
        window = _box_mask(w, h, (0.55, 0.08, 0.92, 0.45))
        img = _over(img, 0.6 * window, np.array([1.0, 0.98, 0.9]))
        u, z, floor = _floor_coords(h, w, int(0.58 * h))
        boards = (np.floor(u * 5) % 3) * 0.05
        grain = 0.5 + 0.5 * np.sin(60 * z + 5 * _value_noise(rng, (h, w), 20)) / (1 + 0.5 * z)
        wood = np.stack([0.5 + 0.08 * grain - boards, 0.32 + 0.05 * grain - boards, 0.2 + 0.03 * grain - boards], -1)
        img[floor] = wood[floor]
        return img, 2.5
    raise ValueError(f"unknown scene {kind!r}")


def render_shot(shot: Shot, rng: np.random.Generator) -> Image.Image:
    w, h = shot.size
    background, dof = render_scene(shot.scene, w, h, rng)
    bg = Image.fromarray((np.clip(background, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(dof))
    canvas = np.asarray(bg, np.float32) / 255.0

    robot = render_robot(int(shot.robot_height * h), shot.yaw, shot.light)
    if shot.mirror:
        robot = robot.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if shot.tilt:
        robot = robot.rotate(shot.tilt, resample=Image.Resampling.BICUBIC, expand=True)
    robot = robot.crop(robot.getchannel("A").getbbox())  # lowest point (a foot) on the bottom edge
    rw, rh = robot.size
    left, top = int(shot.centre_x * w - rw / 2), int(shot.feet_y * h - rh)

    # Cast shadow: the silhouette squashed onto the floor, leaning away from the light, blurred.
    squash = robot.getchannel("A").resize((rw, max(1, rh // 5)))
    lean = -shot.light[0] * 0.5
    squash = squash.transform(squash.size, Image.Transform.AFFINE, (1, lean, -lean * squash.size[1], 0, 1, 0))
    shadow_img = Image.new("L", (w, h), 0)
    shadow_img.paste(squash, (left + int(lean * rh * 0.1), top + rh - squash.size[1]))
    contact = _mask((w, h), lambda d: d.ellipse([left + 0.25 * rw, top + rh - 0.025 * rh,
                                                 left + 0.75 * rw, top + rh + 0.02 * rh], fill=255))
    cast = np.asarray(shadow_img.filter(ImageFilter.GaussianBlur(0.015 * rh + 2)), np.float32) / 255.0
    shadow = np.maximum(0.4 * cast, 0.55 * _blur(contact, 0.012 * rh + 2))
    canvas *= 1.0 - shadow[..., None]

    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    layer.paste(robot, (left, top))
    rgba = np.asarray(layer, np.float32) / 255.0
    canvas = canvas * (1 - rgba[..., 3:]) + rgba[..., :3] * rgba[..., 3:]

    # Photo finish: white balance, vignette, a little lens softness and sensor noise.
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((xs - w / 2) / (0.75 * w)) ** 2 + ((ys - h / 2) / (0.75 * h)) ** 2
    canvas = canvas * np.asarray(shot.white_balance, np.float32) * (1.0 - 0.22 * r2)[..., None]
    canvas += rng.normal(0.0, 0.012, canvas.shape).astype(np.float32)
    img = Image.fromarray((np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(0.5))


def main() -> None:
    start = time.perf_counter()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    for shot in SHOTS:
        path = OUT_DIR / f"{shot.name}.jpg"
        render_shot(shot, rng).save(path, quality=90, optimize=True)
        print(f"{path.relative_to(OUT_DIR.parent)}  {shot.size[0]}x{shot.size[1]}  {path.stat().st_size // 1024} KiB")
    # One caption sidecar, to show the feature: this image trains on its own prompt.
    (OUT_DIR / "robot_04_grass.txt").write_text("a photo of sks toy standing in the grass next to a red ball\n",
                                                encoding="utf-8")
    print(f"rendered {len(SHOTS)} images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
