"""Draw a thumbnail for every bundled workflow: `workflows/<name>.jpg` next to `workflows/<name>.json`.

ComfyUI's template browser shows `/api/workflow_templates/<pack>/<name>.jpg` beside each of a pack's workflows
(frontend 1.27; comfyui-facts.md A2). Our workflows train models, so there is no result image to show before they
run; the thumbnail is the graph itself, drawn from the JSON: groups, nodes as titled boxes at their positions,
links coloured by type, the workflow's heading on top. Drawn with Pillow at twice the size and scaled down (for
smooth curves), so it needs no browser and gives the same picture on every machine with the same Pillow.

    python scripts/make_workflow_thumbnails.py            # every workflows/*.json, and the pack icon
    python scripts/make_workflow_thumbnails.py quickstart  # one
    python scripts/make_workflow_thumbnails.py --icon      # only the pack icon (pyproject's [tool.comfy] Icon)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"

SIZE = (768, 768)  # the template card is about square and shows the image whole (object-fit: contain)
SUPERSAMPLE = 2
HEADING = 50  # heading font size, in output pixels: still readable on a ~220 px card
MARGIN = 24
TITLE_H = 30  # LiteGraph's title bar height, in graph units
SLOT_H = 20
MAX_BYTES = 100_000

BACKGROUND = (24, 24, 27)
BANNER_BG = (36, 36, 42)
NODE_BODY = (53, 53, 58)
NODE_EDGE = (80, 80, 88)
TITLE_OURS = (44, 92, 120)  # DiT Distillery's nodes
TITLE_CORE = (70, 70, 76)
NOTE_TITLE, NOTE_BODY = (102, 85, 51), (68, 51, 34)
TEXT = (235, 235, 235)
SUBTEXT = (170, 170, 178)
LINK_COLOURS = {  # LiteGraph-like colours per socket type
    "DD_PIPELINE": (120, 200, 255), "DD_DATASET": (130, 220, 130), "DD_LOSS": (255, 170, 60),
    "DD_DIT": (200, 140, 255), "DD_LOSS_HISTORY": (255, 120, 120), "IMAGE": (100, 181, 246),
    "STRING": (190, 190, 190), "MODEL": (180, 160, 255), "LATENT": (255, 157, 245),
}


def _font(size: float, bold: bool = False) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (most Linux systems; has →, ², ×), else Pillow's built-in font (ASCII only: see `_text`)."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf", max(6, round(size)))
    except OSError:
        return ImageFont.load_default(size=max(6, round(size)))


ASCII = {"→": "->", "²": "^2", "×": "x", "–": "-", "—": "-", "·": "|", "…": "..."}


def _text(font, text: str) -> str:
    """Text the font can draw: Pillow's built-in font has no arrows, superscripts or accents."""
    if "DejaVu" in (font.getname()[0] or ""):
        return text
    import unicodedata

    text = "".join(ASCII.get(c, c) for c in text)
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def _hex(colour: str, default) -> tuple:
    colour = (colour or "").lstrip("#")
    if len(colour) == 3:
        colour = "".join(c * 2 for c in colour)
    try:
        return tuple(int(colour[i:i + 2], 16) for i in (0, 2, 4))
    except ValueError:
        return default


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    text = _text(font, text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…" if text else ""


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines: list[str] = []
    for word in _text(font, text).split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(_fit(draw, word, font, width))
    return lines


def heading(workflow: dict, name: str) -> tuple[str, str]:
    """(title, subtitle): the first Markdown heading of the workflow's note, else the file name."""
    for node in workflow.get("nodes", []):
        if node.get("type") in ("MarkdownNote", "Note"):
            text = str((node.get("widgets_values") or [""])[0]).replace("**", "").replace("`", "")
            match = re.search(r"^#+\s*(.+)$", text, re.M)
            if match:
                return match.group(1).strip(), name
    return name.replace("_", " "), name


def _bounds(workflow: dict) -> tuple[float, float, float, float]:
    boxes = [(n["pos"][0], n["pos"][1] - TITLE_H, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in workflow["nodes"]]
    boxes += [(g["bounding"][0], g["bounding"][1], g["bounding"][0] + g["bounding"][2],
               g["bounding"][1] + g["bounding"][3]) for g in workflow.get("groups", [])]
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _bezier(a, b, steps: int = 40) -> list[tuple[float, float]]:
    """The S-curve LiteGraph draws from an output (a) to an input (b)."""
    reach = max(40.0, abs(b[0] - a[0]) * 0.5)
    c1, c2 = (a[0] + reach, a[1]), (b[0] - reach, b[1])
    points = []
    for i in range(steps + 1):
        t = i / steps
        u = 1 - t
        points.append((u ** 3 * a[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t ** 3 * b[0],
                       u ** 3 * a[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t ** 3 * b[1]))
    return points


def draw(workflow: dict, name: str) -> Image.Image:
    s = SUPERSAMPLE
    width, height = SIZE[0] * s, SIZE[1] * s
    image = Image.new("RGB", (width, height), BACKGROUND)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))  # translucent groups
    canvas = ImageDraw.Draw(image)
    overlay = ImageDraw.Draw(layer)

    title, subtitle = heading(workflow, name)
    font, small = _font(HEADING * s), _font(HEADING * s * 0.5)
    lines = _wrap(canvas, title, font, width - 2 * MARGIN * s)[:4]
    banner = (MARGIN + len(lines) * HEADING * 1.18 + HEADING * 0.5 + MARGIN) * s
    canvas.rectangle([0, 0, width, banner], fill=BANNER_BG)
    for i, line in enumerate(lines):
        canvas.text((MARGIN * s, (MARGIN + i * HEADING * 1.18) * s), line, fill=TEXT, font=font)
    canvas.text((MARGIN * s, (MARGIN + len(lines) * HEADING * 1.18) * s),
                _fit(canvas, f"DiT Distillery · {subtitle}", small, width - 2 * MARGIN * s), fill=SUBTEXT, font=small)

    left, top, right, bottom = _bounds(workflow)
    area = (MARGIN * s, banner + MARGIN * s, width - MARGIN * s, height - MARGIN * s)
    scale = min((area[2] - area[0]) / (right - left), (area[3] - area[1]) / (bottom - top))
    ox = area[0] + ((area[2] - area[0]) - (right - left) * scale) / 2 - left * scale
    oy = area[1] + ((area[3] - area[1]) - (bottom - top) * scale) / 2 - top * scale

    def at(x, y):
        return ox + x * scale, oy + y * scale

    for group in workflow.get("groups", []):
        x, y, w, h = group["bounding"]
        colour = _hex(group.get("color"), (90, 90, 90))
        overlay.rounded_rectangle([*at(x, y), *at(x + w, y + h)], radius=6 * s, fill=(*colour, 70),
                                  outline=(*colour, 160), width=s)
        font = _font(max(9 * s, min(16 * s, 22 * scale)))
        overlay.text((at(x, y)[0] + 6 * s, at(x, y)[1] + 4 * s), _fit(overlay, group["title"], font, w * scale - 12 * s),
                     fill=(*TEXT, 230), font=font)
    image.paste(layer, (0, 0), layer)

    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link in workflow.get("links", []):
        _, origin, origin_slot, target, target_slot, kind = link[:6]
        a, b = nodes.get(origin), nodes.get(target)
        if a is None or b is None:
            continue
        start = at(a["pos"][0] + a["size"][0], a["pos"][1] + SLOT_H * (origin_slot + 0.5))
        end = at(b["pos"][0], b["pos"][1] + SLOT_H * (target_slot + 0.5))
        muted = 2 in (a.get("mode"), b.get("mode"))
        colour = LINK_COLOURS.get(kind, (200, 200, 200))
        if muted:
            colour = tuple(c // 2 for c in colour)
        canvas.line(_bezier(start, end), fill=colour, width=max(2, round(2.2 * s * min(1.0, scale * 2))), joint="curve")

    title_font = _font(max(8 * s, min(15 * s, 17 * scale)))
    for node in workflow["nodes"]:
        x, y = node["pos"]
        w, h = node["size"]
        note = node.get("type") in ("MarkdownNote", "Note")
        ours = str(node.get("type", "")).startswith("DD_")
        body = NOTE_BODY if note else _hex(node.get("bgcolor"), NODE_BODY)
        bar = NOTE_TITLE if note else _hex(node.get("color"), TITLE_OURS if ours else TITLE_CORE)
        if node.get("mode") == 2:  # muted: drawn faded
            body, bar = tuple((c + 2 * BACKGROUND[i]) // 3 for i, c in enumerate(body)), \
                tuple((c + 2 * BACKGROUND[i]) // 3 for i, c in enumerate(bar))
        top_left, bottom_right = at(x, y - TITLE_H), at(x + w, y + h)
        radius = max(2, 8 * scale)
        canvas.rounded_rectangle([*top_left, *bottom_right], radius=radius, fill=body, outline=NODE_EDGE, width=1)
        canvas.rounded_rectangle([*top_left, bottom_right[0], at(x, y)[1]], radius=radius, fill=bar)
        label = node.get("title") or node.get("type", "")
        canvas.text((top_left[0] + 6 * scale + 2, top_left[1] + (TITLE_H * scale - title_font.size) / 2), 
                    _fit(canvas, label, title_font, w * scale - 12 * scale - 4), fill=TEXT, font=title_font)
        # widget rows, as the frontend draws them (a hint of each node's settings)
        rows = len(node.get("widgets_values") or []) if not note else 0
        slots = max(len(node.get("inputs") or []), len(node.get("outputs") or []))
        row_y = y + slots * SLOT_H + 6
        for _ in range(rows):
            if row_y + 16 > y + h:
                break
            canvas.rounded_rectangle([*at(x + 10, row_y), *at(x + w - 10, row_y + 16)], radius=max(1, 8 * scale),
                                     fill=tuple(min(255, c + 14) for c in body))
            row_y += 24

    return image.resize(SIZE, Image.LANCZOS)


def save(image: Image.Image, path: Path) -> Path:
    """JPEG under MAX_BYTES (lower quality until it fits), written whole or not at all."""
    import io

    for quality in (88, 80, 72, 64, 56):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality, optimize=True, progressive=True)
        if buffer.tell() <= MAX_BYTES:
            break
    tmp = path.with_suffix(".jpg.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)
    return path


ICON = WORKFLOWS / "icon.png"  # the URL in pyproject.toml's [tool.comfy] Icon (the Registry's card)
ICON_SIZE = 400


def draw_icon() -> Image.Image:
    """The pack icon: a tall stack of transformer blocks distilled into a short one, over the pack's name.

    Legible at the Registry's card size (~100 px): two words in bold, a glyph of a few flat shapes.
    """
    s = SUPERSAMPLE
    n = ICON_SIZE * s
    image = Image.new("RGB", (n, n), BACKGROUND)
    canvas = ImageDraw.Draw(image)
    canvas.rounded_rectangle((8 * s, 8 * s, n - 8 * s, n - 8 * s), radius=48 * s, fill=BANNER_BG,
                             outline=TITLE_OURS, width=6 * s)
    block = LINK_COLOURS["DD_DIT"]

    def stack(left: float, width: float, count: int, bottom: float, colour) -> None:
        """`count` DiT blocks (flat rounded bars) standing on `bottom`, in output pixels."""
        for i in range(count):
            top = bottom - (i + 1) * 26
            canvas.rounded_rectangle((left * s, top * s, (left + width) * s, (top + 20) * s), radius=6 * s,
                                     fill=colour)

    stack(62, 116, 6, 206, block)  # the teacher: many blocks
    stack(250, 88, 2, 206, LINK_COLOURS["DD_PIPELINE"])  # the student: a few
    arrow_y = 150 * s
    canvas.line((190 * s, arrow_y, 226 * s, arrow_y), fill=TEXT, width=8 * s)
    canvas.polygon(((240 * s, arrow_y), (222 * s, arrow_y - 14 * s), (222 * s, arrow_y + 14 * s)), fill=TEXT)
    for text, size, y, colour in (("DiT", 84, 268, TEXT), ("Distillery", 50, 334, SUBTEXT)):
        font = _font(size * s, bold=True)
        text = _text(font, text)
        canvas.text((n / 2, y * s), text, fill=colour, font=font, anchor="mm")
    return image.resize((ICON_SIZE, ICON_SIZE), Image.LANCZOS)


def save_icon(image: Image.Image, path: Path = ICON) -> Path:
    """PNG, written whole or not at all."""
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path


def main(argv: list[str]) -> int:
    if argv == ["--icon"] or not argv:
        path = save_icon(draw_icon())
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB)")
        if argv:
            return 0
    names = argv or sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    for name in names:
        workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
        path = save(draw(workflow, name), WORKFLOWS / f"{name}.jpg")
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
