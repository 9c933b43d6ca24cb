"""Subject folders: formats, captions, skipping bad files, transforms and SDXL micro-conditioning."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from dora_diffusion.data import (
    DataError,
    ScanReport,
    SubjectDataset,
    center_crop_box,
    collate_examples,
    load_rgb,
    random_crop_box,
    resize_shorter_side,
    scan_subject_folder,
    to_rgb,
)
from helpers import SAMPLE

RES = 64  # small training resolution: every test stays fast


def solid(size=(80, 64), colour=(200, 30, 60), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noise_image(size=(96, 64), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def scan_quietly(folder: Path, resolution: int = RES, **kwargs) -> ScanReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return scan_subject_folder(folder, resolution, **kwargs)


# ------------------------------------------------------------------------------ formats and modes
@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPG", ".Png"])
def test_each_accepted_format_is_used(tmp_path, suffix):
    solid().save(tmp_path / f"subject{suffix}")
    report = scan_subject_folder(tmp_path, RES)
    assert [r.path.name for r in report.used] == [f"subject{suffix}"]
    assert (report.used[0].width, report.used[0].height) == (80, 64)
    pixel = np.asarray(load_rgb(tmp_path / f"subject{suffix}"))[32, 40]
    assert np.abs(pixel.astype(int) - (200, 30, 60)).max() <= 6  # lossy formats: close


@pytest.mark.parametrize(
    "image, expected",
    [
        (solid(mode="L", colour=77), (77, 77, 77)),
        (solid(mode="1", colour=1), (255, 255, 255)),
        (solid().convert("P", palette=Image.Palette.ADAPTIVE), (200, 30, 60)),
        (solid(mode="CMYK", colour=(0, 255, 255, 0)), (255, 0, 0)),
        (Image.fromarray(np.full((64, 80), 32768, np.uint16)), (128, 128, 128)),  # I;16
        (Image.fromarray(np.full((64, 80), 65535, np.uint16)), (255, 255, 255)),
        (Image.fromarray(np.full((64, 80), 32768, np.int32)), (128, 128, 128)),  # I (16-bit PNG data)
    ],
    ids=["L", "1", "P", "CMYK", "I;16-mid", "I;16-max", "I"],
)
def test_modes_become_8bit_rgb(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert tuple(np.asarray(rgb)[10, 10]) == expected


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.full((64, 80), 32768, np.uint16)
    values[:, :10] = 0
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode in ("I;16", "I")
    pixels = np.asarray(load_rgb(tmp_path / "grey16.png"))
    assert tuple(pixels[5, 40]) == (128, 128, 128)
    assert tuple(pixels[5, 0]) == (0, 0, 0)


def test_cmyk_jpeg_and_palette_png_files(tmp_path):
    solid(mode="CMYK", colour=(0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    solid().convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    report = scan_subject_folder(tmp_path, RES)
    assert len(report.used) == 2
    for record in report.used:
        pixel = np.asarray(load_rgb(record.path))[32, 40].astype(int)
        assert pixel[0] > 180 and pixel[1] < 70 and pixel[2] < 80, record.path.name


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (80, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 40, 64))  # left half opaque red, right half transparent
    rgba.save(tmp_path / "rgba.png")
    la = Image.new("LA", (80, 64), (0, 0))
    la.save(tmp_path / "la.png")
    palette = Image.new("P", (80, 64), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)

    rgb = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert tuple(rgb[10, 10]) == (255, 0, 0)
    assert tuple(rgb[10, 70]) == (255, 255, 255)
    assert tuple(np.asarray(load_rgb(tmp_path / "la.png"))[10, 10]) == (255, 255, 255)
    assert tuple(np.asarray(load_rgb(tmp_path / "palette.png"))[10, 10]) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (120, 64), (255, 0, 0))
    stored.paste((0, 0, 255), (60, 0, 120, 64))  # left red, right blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)

    record = scan_subject_folder(tmp_path, RES).used[0]
    assert (record.width, record.height) == (64, 120)
    assert record.original_size == (120, 64)
    shown = np.asarray(load_rgb(tmp_path / "phone.jpg")).astype(int)
    assert shown.shape == (120, 64, 3)
    assert shown[10, 32, 0] > 200 and shown[10, 32, 2] < 60  # stored left (red) is now on top
    assert shown[110, 32, 2] > 200 and shown[110, 32, 0] < 60


# ------------------------------------------------------------------------------ captions
def test_caption_sidecar_is_used_else_instance_prompt(tmp_path):
    solid().save(tmp_path / "a.png")
    solid().save(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("  a photo of sks toy on a beach \n", encoding="utf-8")
    (tmp_path / "orphan.txt").write_text("no image for this caption", encoding="utf-8")

    report = scan_subject_folder(tmp_path, RES)
    assert [r.caption for r in report.used] == ["a photo of sks toy on a beach", None]
    assert [p.name for p in report.ignored] == ["orphan.txt"]
    dataset = SubjectDataset(report, "a photo of sks toy", RES)
    assert [dataset[i]["prompt"] for i in range(2)] == ["a photo of sks toy on a beach", "a photo of sks toy"]
    assert "1 from .txt sidecars" in report.summary()


def test_caption_that_is_not_utf8_names_the_file(tmp_path):
    solid().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe\xfa caption")
    with pytest.raises(DataError, match="a.txt"):
        scan_subject_folder(tmp_path, RES)


# ------------------------------------------------------------------------------ folder errors
def test_missing_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(DataError, match="not found.*nowhere"):
        scan_subject_folder(tmp_path / "nowhere", RES)
    solid().save(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a folder.*x.png"):
        scan_subject_folder(tmp_path / "x.png", RES)


def test_empty_folder_names_it(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"hidden files do not count")
    with pytest.raises(DataError, match=f"empty: {tmp_path}"):
        scan_subject_folder(tmp_path, RES)


def test_no_images_lists_what_was_found(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    solid().save(tmp_path / "anim.gif")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=str(tmp_path)) as excinfo:
        scan_subject_folder(tmp_path, RES)
    message = str(excinfo.value)
    assert ".gif (1)" in message and ".md (1)" in message and "folder (1)" in message and ".png" in message


def test_all_skipped_names_folder_and_reasons(tmp_path):
    solid((10, 10)).save(tmp_path / "tiny.png")
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=str(tmp_path)) as excinfo:
        scan_quietly(tmp_path)
    assert "tiny.png" in str(excinfo.value) and "junk.jpg" in str(excinfo.value)


# ------------------------------------------------------------------------------ symlinks
def test_symlinks_inside_are_followed_outside_named_broken_reported(tmp_path):
    """A link to an image in the folder is used quietly; a link to a file outside it is used with a
    warning naming both; a dangling link is reported by name as broken, not counted as ignored."""
    folder, elsewhere = tmp_path / "subject", tmp_path / "library"
    folder.mkdir()
    elsewhere.mkdir()
    noise_image(seed=1).save(folder / "real.png")
    (folder / "inside.png").symlink_to("real.png")
    noise_image(seed=2).save(elsewhere / "far.png")
    (folder / "outside.png").symlink_to(elsewhere / "far.png")
    (folder / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = scan_subject_folder(folder, RES)
    messages = [str(w.message) for w in caught]
    assert [r.path.name for r in report.used] == ["inside.png", "outside.png", "real.png"]
    assert report.linked_outside == [(folder / "outside.png", (elsewhere / "far.png").resolve())]
    assert report.broken_links == [(folder / "dangling.jpg", tmp_path / "gone.jpg")] and report.ignored == []
    assert any("outside.png" in m and str(elsewhere / "far.png") in m for m in messages), messages
    assert any("dangling.jpg" in m and "broken" in m for m in messages), messages
    assert not any("inside.png" in m for m in messages), messages
    summary = report.summary()
    assert (
        "outside.png -> " in summary
        and "broken symlink dangling.jpg" in summary
        and "ignored" not in summary.split("\n", 1)[1]
    )


def test_only_broken_symlinks_names_them(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="broken symlink.*a.jpg"):
        scan_quietly(tmp_path)


# ------------------------------------------------------------------------------ skipped images
def test_corrupt_and_truncated_files_are_skipped_with_warnings(tmp_path):
    noise_image().save(tmp_path / "good.jpg", quality=90)
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) * 6 // 10])
    (tmp_path / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (tmp_path / "readme.md").write_text("ignored silently")

    with pytest.warns(UserWarning) as caught:
        report = scan_subject_folder(tmp_path, RES)
    messages = [str(w.message) for w in caught]
    assert any("truncated.jpg" in m for m in messages) and any("random.png" in m for m in messages)
    assert not any("readme.md" in m for m in messages)
    assert [r.path.name for r in report.used] == ["good.jpg"]
    assert {p.name for p, _ in report.skipped} == {"truncated.jpg", "random.png"}
    assert [p.name for p in report.ignored] == ["readme.md"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    summary = report.summary()
    assert "truncated.jpg" in summary and "random.png" in summary and ".md (1)" in summary


def test_decompression_bomb_is_skipped_by_max_pixels(tmp_path):
    solid((400, 300)).save(tmp_path / "huge.png")
    solid().save(tmp_path / "fine.png")
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.warns(UserWarning, match="huge.png.*decompression bomb"):
        report = scan_subject_folder(tmp_path, RES, max_pixels=100_000)
    assert [r.path.name for r in report.used] == ["fine.png"]
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_pillow_bomb_warning_is_an_error_only_inside_the_scan(tmp_path, monkeypatch):
    solid((400, 300)).save(tmp_path / "huge.png")  # 120k pixels: warns above 100k, errors above 200k
    solid((300, 100)).save(tmp_path / "fine.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)  # undone after the test
    filters_before = list(warnings.filters)
    with pytest.warns(UserWarning, match="huge.png.*decompression bomb"):
        report = scan_subject_folder(tmp_path, RES)
    assert [r.path.name for r in report.used] == ["fine.png"]
    assert warnings.filters == filters_before


def test_images_far_below_resolution_are_skipped(tmp_path):
    solid((100, 200)).save(tmp_path / "tiny.png")  # shorter side 100 < 0.5 * 256
    solid((130, 300)).save(tmp_path / "small_ok.png")  # 130 >= 128: kept, upscaled
    with pytest.warns(UserWarning, match="tiny.png.*too small"):
        report = scan_subject_folder(tmp_path, 256)
    assert [r.path.name for r in report.used] == ["small_ok.png"]
    assert "upscaled" in report.summary()
    assert len(scan_quietly(tmp_path, 256, min_side_ratio=0.3).used) == 2


# ------------------------------------------------------------------------------ transforms
def gradient_image(width: int, height: int) -> Image.Image:
    """Unique-ish pixels: red encodes x, green encodes y."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([xs, ys, 255 - xs], -1).astype(np.uint8))


def expected_pixels(path: Path, res: int, top: int, left: int, flip: bool) -> torch.Tensor:
    resized = resize_shorter_side(load_rgb(path), res)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = np.asarray(resized.crop((left, top, left + res, top + res)), np.float32)
    return torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1.0


def test_center_crop_micro_conditioning_non_square(tmp_path):
    gradient_image(300, 150).save(tmp_path / "wide.png")
    gradient_image(100, 250).save(tmp_path / "tall.png")
    dataset = SubjectDataset(tmp_path, "a photo of sks toy", RES, center_crop=True)
    by_name = {Path(dataset[i]["path"]).name: dataset[i] for i in range(len(dataset))}

    wide = by_name["wide.png"]  # resized to 128x64: crop left (128 - 64) / 2 = 32
    assert wide["original_size"] == (150, 300)
    assert wide["crop_top_left"] == (0, 32)
    assert wide["target_size"] == (RES, RES)
    tall = by_name["tall.png"]  # resized to 64x160: crop top (160 - 64) / 2 = 48
    assert tall["original_size"] == (250, 100)
    assert tall["crop_top_left"] == (48, 0)
    for example in (wide, tall):
        top, left = example["crop_top_left"]
        expected = expected_pixels(Path(example["path"]), RES, top, left, flip=False)
        torch.testing.assert_close(example["pixel_values"], expected)


def test_random_crop_and_flip_micro_conditioning(tmp_path):
    gradient_image(300, 150).save(tmp_path / "wide.png")
    dataset = SubjectDataset(tmp_path, "p", RES, flip_p=1.0, seed=3)
    lefts = set()
    for epoch in range(6):
        example = dataset.example(0, epoch)
        top, left = example["crop_top_left"]
        assert top == 0 and 0 <= left <= 128 - RES
        lefts.add(left)
        # crop_top_left is where the crop sits in the flipped resized image (diffusers flips, then crops)
        expected = expected_pixels(tmp_path / "wide.png", RES, top, left, flip=True)
        torch.testing.assert_close(example["pixel_values"], expected)
    assert len(lefts) > 1  # the crop moves between epochs


def test_flip_probability_zero_never_flips(tmp_path):
    gradient_image(64, 64).save(tmp_path / "square.png")
    example = SubjectDataset(tmp_path, "p", RES, flip_p=0.0).example(0, 0)
    assert example["crop_top_left"] == (0, 0)
    torch.testing.assert_close(example["pixel_values"], expected_pixels(tmp_path / "square.png", RES, 0, 0, flip=False))


def test_output_shape_dtype_and_range(tmp_path):
    solid((90, 70), (255, 255, 255)).save(tmp_path / "white.png")
    solid((70, 90), (0, 0, 0)).save(tmp_path / "black.png")
    noise_image((150, 100)).save(tmp_path / "noise.png")
    dataset = SubjectDataset(tmp_path, "p", RES, flip_p=0.5)
    examples = {Path(e["path"]).name: e for e in (dataset[i] for i in range(len(dataset)))}
    for example in examples.values():
        pixels = example["pixel_values"]
        assert pixels.shape == (3, RES, RES) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert torch.all(examples["white.png"]["pixel_values"] == 1.0)
    assert torch.all(examples["black.png"]["pixel_values"] == -1.0)


def test_same_seed_same_examples_different_seed_different_crops(tmp_path):
    for i in range(3):
        noise_image((200, 100), seed=i).save(tmp_path / f"img{i}.png")

    def run(seed: int, preload: bool = True) -> list[dict]:
        dataset = SubjectDataset(tmp_path, "p", RES, flip_p=0.5, seed=seed, preload=preload)
        out = []
        for epoch in range(3):
            dataset.set_epoch(epoch)
            out.extend(dataset[i] for i in range(len(dataset)))
        return out

    first, second, lazy, other = run(7), run(7), run(7, preload=False), run(8)
    for a, b, c in zip(first, second, lazy, strict=True):
        assert a["crop_top_left"] == b["crop_top_left"] == c["crop_top_left"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["pixel_values"], c["pixel_values"])
    assert [e["crop_top_left"] for e in first] != [e["crop_top_left"] for e in other]
    epochs = [e["crop_top_left"] for e in first]
    assert epochs[:3] != epochs[3:6]  # a new epoch gives new crops


@settings(max_examples=50, deadline=None)
@given(height=st.integers(16, 400), width=st.integers(16, 400), seed=st.integers(0, 2**32 - 1))
def test_crop_boxes_stay_inside_the_image(height, width, seed):
    size = min(height, width)
    top, left = center_crop_box(height, width, size)
    assert 0 <= top <= height - size and 0 <= left <= width - size
    top, left = random_crop_box(height, width, size, np.random.default_rng(seed))
    assert 0 <= top <= height - size and 0 <= left <= width - size
    assert 0 <= width - left - size <= width - size  # the flipped left is inside too


# ------------------------------------------------------------------------------ batching
def test_collate_examples_builds_add_time_ids(tmp_path):
    gradient_image(300, 150).save(tmp_path / "a.png")
    gradient_image(100, 250).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("custom caption", encoding="utf-8")
    dataset = SubjectDataset(tmp_path, "a photo of sks toy", RES, center_crop=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_examples)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 3, RES, RES)
    assert batch["prompts"] == ["a photo of sks toy", "custom caption"]
    assert batch["add_time_ids"].dtype == torch.long
    assert batch["add_time_ids"].tolist() == [[150, 300, 0, 32, RES, RES], [250, 100, 48, 0, RES, RES]]
    assert [Path(p).name for p in batch["paths"]] == ["a.png", "b.png"]


def test_dataset_argument_checks(tmp_path):
    solid().save(tmp_path / "a.png")
    with pytest.raises(DataError, match="instance_prompt"):
        SubjectDataset(tmp_path, "  ", RES)
    with pytest.raises(DataError, match="flip_p"):
        SubjectDataset(tmp_path, "p", RES, flip_p=1.5)


# ------------------------------------------------------------------------------ the sample subject
def test_sample_dataset_scans_clean_at_512():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no image of the sample may be skipped
        report = scan_subject_folder(SAMPLE, 512)
    assert 6 <= len(report.used) <= 8
    assert not report.skipped and not report.ignored
    assert all(min(r.width, r.height) >= 512 for r in report.used)
    assert sum(r.caption is not None for r in report.used) == 1
