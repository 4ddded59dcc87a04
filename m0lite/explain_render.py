"""Pictures of an explanation (m0lite/explain.py), drawn with Pillow alone.

`render(explanation, query, image, text)` draws, under a title with the query and the score, the
page with its regions' attributions as a heatmap over it and a colour bar beside it, and the
document text with each token's background coloured by its attribution. One colour scale serves the
whole picture, symmetric about zero: red raises the score (or, for "attention", draws the score
token's attention), blue lowers it, white is zero.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MAX_SIDE, MIN_SIDE = 1024, 384  # the page is drawn with its longer side within these
MARGIN, BAR_WIDTH, FONT_SIZE = 16, 18, 15
HEAT_ALPHA = 0.55  # heatmap opacity over the page


@dataclass
class Figure:
    image: Image.Image
    page_box: tuple[int, int, int, int] | None  # where the page is drawn (x0, y0, x1, y1)
    scale: float  # figure pixels per original-image pixel


def colour(v: float) -> tuple[int, int, int]:
    """v in [-1, 1] -> white at 0, red at +1, blue at -1."""
    v = max(-1.0, min(1.0, v))
    fade = round(255 * (1 - abs(v)))
    return (255, fade, fade) if v >= 0 else (fade, fade, 255)


def _font(size: int = FONT_SIZE):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType has only the fixed bitmap font
        return ImageFont.load_default()


def _heatmap(regions: list[dict], rows: int, cols: int, span: float, size: tuple[int, int]) -> Image.Image:
    """The regions' colours on their merged grid, scaled to `size` (each cell to its region's pixels)."""
    cells = np.zeros((rows, cols, 3), dtype=np.uint8)
    for r in regions:
        cells[r["row"], r["col"]] = colour(r["score"] / span)
    return Image.fromarray(cells).resize(size, Image.Resampling.NEAREST)


def _text_runs(text: str, tokens: list[dict]) -> list[tuple[str, float | None]]:
    """The text cut into (piece, score) runs in order; characters outside every token have no score."""
    runs, pos = [], 0
    for t in tokens:
        start = max(t["start"], pos)
        if start > pos:
            runs.append((text[pos:start], None))
        if t["end"] > start:
            runs.append((text[start:t["end"]], t["score"]))
        pos = max(pos, t["end"])
    if pos < len(text):
        runs.append((text[pos:], None))
    return runs


def _layout_text(draw, runs, font, width: int, line_height: int):
    """Word-wrapped placement of the runs: [(x, y, piece, score)] and the height they take."""
    placed, x, y = [], 0, 0
    for piece, score in runs:
        for k, line in enumerate(piece.split("\n")):
            if k:
                x, y = 0, y + line_height
            if not line:
                continue
            w = draw.textlength(line, font=font)
            if x and x + w > width:
                x, y = 0, y + line_height
            placed.append((x, y, line, score))
            x += w
    return placed, y + line_height


def render(explanation: dict, query: str, image: Image.Image | None = None, text: str | None = None) -> Figure:
    """The picture of one explanation; `image` is the document's original image, `text` its text."""
    font, small = _font(), _font(FONT_SIZE - 3)
    scores = [t["score"] for t in explanation["text"]]
    info = explanation.get("image")
    if info is not None:
        scores += [r["score"] for r in info["regions"]]
    span = max((abs(s) for s in scores), default=0.0) or 1.0

    scale, page_size = 1.0, None
    if image is not None and info is not None:
        longest = max(image.size)
        scale = min(MAX_SIDE / longest, max(1.0, MIN_SIDE / longest))
        page_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    width = max(640, page_size[0] + 3 * MARGIN + BAR_WIDTH + 60 if page_size else 0)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = textwrap.wrap(f"query: {query}", 90)[:3] + [
        f"score {explanation['score']:.4f} (raw {explanation['raw_score']:.4f}), {explanation['method']}"]
    line_height = FONT_SIZE + 6
    y = MARGIN + line_height * len(title) + MARGIN // 2
    page_box = None
    if page_size:
        page_box = (MARGIN, y, MARGIN + page_size[0], y + page_size[1])
        y = page_box[3] + MARGIN
    placed = []
    if text:
        placed, text_height = _layout_text(scratch, _text_runs(text, explanation["text"]), font, width - 2 * MARGIN, line_height)
        text_top, y = y, y + text_height + MARGIN

    fig = Image.new("RGB", (width, y + MARGIN // 2), "white")
    draw = ImageDraw.Draw(fig)
    for k, line in enumerate(title):
        draw.text((MARGIN, MARGIN + k * line_height), line, fill="black", font=font)
    if page_box:
        page = image.convert("RGB").resize(page_size, Image.Resampling.BILINEAR)
        heat = _heatmap(info["regions"], info["rows"], info["cols"], span, page_size)
        fig.paste(Image.blend(page, heat, HEAT_ALPHA), page_box[:2])
        _colour_bar(draw, (page_box[2] + MARGIN, page_box[1], page_box[2] + MARGIN + BAR_WIDTH, page_box[3]), span, small)
    for x, ty, piece, score in placed:
        x0, y0 = MARGIN + x, text_top + ty
        if score is not None:
            draw.rectangle((x0, y0, x0 + draw.textlength(piece, font=font), y0 + line_height - 2), fill=colour(score / span))
        draw.text((x0, y0 + 2), piece, fill="black", font=font)
    return Figure(fig, page_box, scale)


def _colour_bar(draw, box: tuple[int, int, int, int], span: float, font) -> None:
    """A vertical bar from +span (top) through 0 to -span (bottom), labelled at both ends and the middle."""
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        draw.line((x0, y, x1, y), fill=colour(1 - 2 * (y - y0) / max(y1 - y0 - 1, 1)))
    draw.rectangle(box, outline="black")
    for label, y in ((f"+{span:.3g}", y0), ("0", (y0 + y1) // 2 - 6), (f"-{span:.3g}", y1 - 12)):
        draw.text((x1 + 4, y), label, fill="black", font=font)
