"""Pascal VOC folders: parse and validate annotation XML, pair it with its image.

Pure functions (file reads, no database): :mod:`apex_assets.lib.voc_import`
turns the result into source-database rows. Kept apart so that every rule that
decides whether a file is trusted can be tested without PostgreSQL.

Rules, and why:

* An XML file is matched to the image with the same stem (``crazing_1.xml`` ->
  ``crazing_1.jpg``); ``<filename>`` is only a fallback. Labelling tools name
  the XML after the image, while ``<filename>`` is often stale or written
  without a suffix (147 NEU-DET files say ``patches_104``).
* A file is trusted whole or not at all: one bad ``<object>`` (no ``<name>``,
  empty box, box outside the image) rejects the file with its image. Dropping
  only the bad box would misstate the image's label (a one-box image would read
  as defect-free).
* An XML with no ``<object>`` is a valid "no defect" label; an image *without*
  an XML is not imported (see :func:`pair_voc_files`): it is unlabelled, and
  importing it would make it read as defect-free.
* ``<size>`` must agree with the real image (read from the header by PIL, no
  pixel decode); a missing or zero ``<size>`` (some tools write 0) falls back
  to the real size. Boxes are checked against that size:
  ``0 <= xmin < xmax <= width`` (VOC pixel indices are 1-based, so
  ``xmax == width`` is legal and common: 466 NEU-DET boxes touch the edge).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: Image suffixes recognised in an image folder (lower case); other files are ignored.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
)

#: An annotation file larger than this is rejected unread (a VOC file is a few KB).
MAX_XML_BYTES = 5 * 1024 * 1024

_JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


class VocError(ValueError):
    """One file cannot be trusted; the message is the reason shown to the operator.

    ``file_name`` names the file at fault when it is known (the image for an
    unreadable image, the XML for a bad box), so the report points at the file
    the operator has to fix.
    """

    def __init__(self, reason: str, file_name: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.file_name = file_name


@dataclass(frozen=True)
class VocObject:
    """One ``<object>``: a defect box with the class name exactly as written."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False

    def bounding_box(self) -> dict[str, int | float]:
        """The source-schema box ``{x, y, width, height}`` (integers where the XML had them)."""
        return {
            "x": _num(self.xmin),
            "y": _num(self.ymin),
            "width": _num(self.xmax - self.xmin),
            "height": _num(self.ymax - self.ymin),
        }


@dataclass(frozen=True)
class VocAnnotation:
    """A parsed annotation file. ``width``/``height`` are None when ``<size>`` is absent or 0."""

    filename: str | None
    width: int | None
    height: int | None
    objects: tuple[VocObject, ...]


@dataclass(frozen=True)
class VocPair:
    """An annotation file and the image it describes (both inside their folders)."""

    xml_path: Path
    image_path: Path
    annotation: VocAnnotation


@dataclass(frozen=True)
class VocItem:
    """A validated pair: the image's real size and the boxes checked against it."""

    xml_path: Path
    image_path: Path
    width: int
    height: int
    objects: tuple[VocObject, ...]


@dataclass(frozen=True)
class VocPairing:
    """Result of :func:`pair_voc_files`: good pairs plus ``(file name, reason)`` rejects."""

    pairs: list[VocPair]
    skipped: list[tuple[str, str]]


def _num(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _text(elem: ET.Element, tag: str) -> str | None:
    child = elem.find(tag)
    if child is None or child.text is None:
        return None
    text = child.text.strip()
    return text or None


def _coord(bndbox: ET.Element, tag: str, where: str) -> float:
    raw = _text(bndbox, tag)
    if raw is None:
        raise VocError(f"{where}: <bndbox> has no <{tag}>")
    try:
        value = float(raw)
    except ValueError:
        raise VocError(f"{where}: <{tag}> is not a number ({raw!r})") from None
    if not math.isfinite(value):
        raise VocError(f"{where}: <{tag}> is not finite ({raw!r})")
    return value


def _size(root: ET.Element, tag: str) -> int | None:
    size = root.find("size")
    if size is None:
        return None
    raw = _text(size, tag)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise VocError(f"<size><{tag}> is not a number ({raw!r})") from None
    if not value.is_integer() or value < 0:
        raise VocError(f"<size><{tag}> must be a whole number of pixels, got {raw!r}")
    return int(value) or None  # 0 = "unknown" in some tools


def _flag(elem: ET.Element, tag: str) -> bool:
    return (_text(elem, tag) or "0") in {"1", "true", "True"}


def parse_voc_xml(data: bytes | str) -> VocAnnotation:
    """Parse one VOC annotation document; raise :class:`VocError` for anything malformed.

    Structure only: boxes are checked against the image in :func:`validate_annotation`,
    because the authoritative size is the image's, not the XML's.
    """
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise VocError(f"malformed XML: {exc}") from None
    if root.tag != "annotation":
        raise VocError(f"root element is <{root.tag}>, expected <annotation>")
    objects: list[VocObject] = []
    for index, obj in enumerate(root.findall("object"), start=1):
        where = f"object {index}"
        name = _text(obj, "name")
        if name is None:
            raise VocError(f"{where}: missing <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise VocError(f"{where} ({name}): missing <bndbox>")
        objects.append(
            VocObject(
                name=name,
                xmin=_coord(bndbox, "xmin", where),
                ymin=_coord(bndbox, "ymin", where),
                xmax=_coord(bndbox, "xmax", where),
                ymax=_coord(bndbox, "ymax", where),
                difficult=_flag(obj, "difficult"),
                truncated=_flag(obj, "truncated"),
            )
        )
    return VocAnnotation(
        filename=_text(root, "filename"),
        width=_size(root, "width"),
        height=_size(root, "height"),
        objects=tuple(objects),
    )


def read_voc_file(path: Path) -> VocAnnotation:
    """Read and parse one annotation file (size-capped, so a stray huge file cannot stall us)."""
    size = path.stat().st_size
    if size > MAX_XML_BYTES:
        raise VocError(f"annotation file is {size} bytes, larger than {MAX_XML_BYTES}")
    return parse_voc_xml(path.read_bytes())


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header, rejecting unreadable or truncated files.

    PIL reads the size without decoding pixels. A truncated file (interrupted
    copy to the NAS) still has a good header, so JPEG and PNG files are also
    checked for their end marker in the last bytes; only a file failing that
    cheap test is fully decoded, which decides for certain.
    """
    try:
        with Image.open(path) as im:
            width, height = im.size
            fmt = im.format
    except Image.DecompressionBombError as exc:
        raise VocError(f"image refused by PIL: {exc}") from None
    except OSError as exc:  # UnidentifiedImageError is an OSError
        raise VocError(f"unreadable image: {exc}") from None
    if width <= 0 or height <= 0:
        raise VocError(f"image has no pixels ({width}x{height})")
    if not _has_end_marker(path, fmt):
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as exc:  # any decoder failure means the same: the file is damaged
            raise VocError(f"corrupt or truncated image: {exc}") from None
    return width, height


def _has_end_marker(path: Path, fmt: str | None) -> bool:
    """True when the file visibly ends as its format requires (or the format has no marker)."""
    if fmt not in {"JPEG", "MPO", "PNG"}:
        return True
    with path.open("rb") as fh:
        fh.seek(0, 2)
        length = fh.tell()
        fh.seek(max(0, length - 64))
        tail = fh.read()
    if fmt == "PNG":
        return b"IEND" in tail
    return tail.rstrip(b"\x00\r\n\t ").endswith(b"\xff\xd9")


def validate_annotation(annotation: VocAnnotation, image_size: tuple[int, int]) -> tuple[int, int]:
    """Check ``<size>`` and every box against the real image size; return the size to store."""
    width, height = image_size
    xml_w, xml_h = annotation.width, annotation.height
    if (xml_w is not None and xml_w != width) or (xml_h is not None and xml_h != height):
        raise VocError(f"<size> says {xml_w}x{xml_h} but the image is {width}x{height}")
    for index, obj in enumerate(annotation.objects, start=1):
        where = f"object {index} ({obj.name})"
        if obj.xmax <= obj.xmin or obj.ymax <= obj.ymin:
            raise VocError(
                f"{where}: empty box (xmin={_num(obj.xmin)}, xmax={_num(obj.xmax)}, "
                f"ymin={_num(obj.ymin)}, ymax={_num(obj.ymax)})"
            )
        if obj.xmin < 0 or obj.ymin < 0 or obj.xmax > width or obj.ymax > height:
            raise VocError(
                f"{where}: box ({_num(obj.xmin)}, {_num(obj.ymin)}, {_num(obj.xmax)}, "
                f"{_num(obj.ymax)}) lies outside the {width}x{height} image"
            )
    return width, height


def _listing(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    """Regular, non-hidden files of ``folder`` with one of ``suffixes``, sorted by name."""
    return sorted(
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in suffixes and p.is_file()
    )


def pair_voc_files(images_dir: Path, annotations_dir: Path) -> VocPairing:
    """Parse every XML of ``annotations_dir`` and find its image in ``images_dir``.

    Flat folders, as in the VOC layout (``Annotations/``, ``JPEGImages/``); both
    may be the same folder (LabelImg saves the XML beside the image). Rejected,
    each with the file name and reason: unparsable XML, XML without image, XML
    whose stem matches several images, XML claiming an image already claimed,
    and images without XML (not imported: an unlabelled image is not a
    defect-free one). Files with other suffixes are ignored.
    """
    images = _listing(images_dir, IMAGE_SUFFIXES)
    xmls = _listing(annotations_dir, frozenset({".xml"}))
    by_stem: dict[str, list[Path]] = {}
    by_name: dict[str, Path] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
        by_name[image.name] = image

    pairs: list[VocPair] = []
    skipped: list[tuple[str, str]] = []
    claimed: dict[Path, str] = {}
    for xml_path in xmls:
        try:
            annotation = read_voc_file(xml_path)
        except VocError as exc:
            skipped.append((xml_path.name, str(exc)))
            # The image is accounted for by this report, not reported again as "no XML".
            for image in by_stem.get(xml_path.stem, []):
                claimed.setdefault(image, xml_path.name)
            continue
        except OSError as exc:
            skipped.append((xml_path.name, f"unreadable annotation file: {exc}"))
            for image in by_stem.get(xml_path.stem, []):
                claimed.setdefault(image, xml_path.name)
            continue
        candidates = by_stem.get(xml_path.stem, [])
        if not candidates and annotation.filename:
            # Basename only: <filename> must never lead outside the image folder.
            named = by_name.get(Path(annotation.filename.replace("\\", "/")).name)
            candidates = [named] if named is not None else []
        if not candidates:
            skipped.append(
                (xml_path.name, f"no image named {xml_path.stem}.* in {images_dir.name}/")
            )
            continue
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            skipped.append((xml_path.name, f"several images match: {names}"))
            for image in candidates:
                claimed.setdefault(image, xml_path.name)
            continue
        image = candidates[0]
        if image in claimed:
            skipped.append(
                (xml_path.name, f"image {image.name} is already annotated by {claimed[image]}")
            )
            continue
        claimed[image] = xml_path.name
        pairs.append(VocPair(xml_path=xml_path, image_path=image, annotation=annotation))

    for image in images:
        if image not in claimed:
            skipped.append((image.name, "image without annotation XML: not imported (unlabelled)"))
    return VocPairing(pairs=pairs, skipped=skipped)


def load_voc_pair(pair: VocPair) -> VocItem:
    """Read the image header and validate the pair.

    Raises :class:`VocError` whose ``file_name`` is the image (unreadable,
    corrupt) or the XML (size mismatch, bad box): the file to fix.
    """
    try:
        size = read_image_size(pair.image_path)
    except OSError as exc:  # e.g. permission denied on the end-marker read
        raise VocError(f"unreadable image: {exc}", pair.image_path.name) from None
    except VocError as exc:
        raise VocError(exc.reason, pair.image_path.name) from None
    try:
        width, height = validate_annotation(pair.annotation, size)
    except VocError as exc:
        raise VocError(exc.reason, pair.xml_path.name) from None
    return VocItem(
        xml_path=pair.xml_path,
        image_path=pair.image_path,
        width=width,
        height=height,
        objects=pair.annotation.objects,
    )
