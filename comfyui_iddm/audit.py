"""Does a file about to be published carry traces of the private photos?

Reads the metadata of PNG (tEXt / zTXt / iTXt / eXIf and ComfyUI's animated-PNG `comf` chunks),
JPEG (EXIF, XMP, comments, other APP segments) and WebP (EXIF, XMP) images, workflow JSON files
(ComfyUI's UI and API formats, also nested, e.g. the `prompt` and `workflow` that the stock Save
Image node embeds, or a /history dump), the header of .safetensors files (a LoRA's metadata: kohya's
training scripts record dataset folders, paths, output names and hashes there) and HTML pages (their
text and the images embedded in them). Reports:
- absolute paths, paths in home folders (they name the account), `~` paths;
- photo file names (IMG_1234.jpg, anything.png, ...);
- the folder of IDDM Load Private Photos (its name is published with the graph);
- LoRA names (IDDM Train, IDDM Load Protected LoRA, LoRA loaders) that are not the neutral
  iddm_<date>_<id>;
- GPS positions and owner/author tags in EXIF;
- in LoRA metadata: training-data folder names, output names that are not neutral, hashes of files.
Formats are recognised by their first bytes, not their file names. Images are read with Pillow's
readers; one it cannot read (damaged, or with more compressed text than it reads safely) is listed as
not checked. In a folder, every other file (and every hidden one) is listed as not checked. Nothing is
written.
"""
from __future__ import annotations

import io
import json
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, JpegImagePlugin, PngImagePlugin
from PIL.ExifTags import TAGS

from .private_root import is_neutral_lora_name

KINDS = {
    "home_dir": "a path inside a home folder: it names the account on your computer",
    "absolute_path": "an absolute path: it shows where your files are kept",
    "photo_file_name": "a photo file name: it can identify a photo of the person",
    "private_folder": "the folder of the private photos: its name is published with the graph; make "
                      "sure it names nobody",
    "lora_name": "a LoRA name other than the neutral iddm_<date>_<id>: LoRA names travel with the "
                 "graph and often name the person",
    "gps_location": "a GPS position: it tells where the photo was taken",
    "personal_tag": "an author, owner or camera-serial tag",
    "file_hash": "a hash of a file, e.g. of a training photo: whoever has the photo can prove it was used",
}
AUDITED_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".json", ".safetensors",
                    ".html", ".htm"}
# Model files that only unpickling can read (which runs code): never opened here.
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# safetensors headers are at most 100 MB (the format's own limit); only the header is read.
MAX_SAFETENSORS_HEADER = 100_000_000

# UI-format workflows store widget values by position. Positions of the sensitive widgets of the
# IDDM nodes (tests/test_audit.py checks them against nodes/spec.py) and the stock LoRA loaders.
# IDDM Train's lora_name is widget 4, and 16 in graphs of pack 0.1 (whose widget 4 is a number).
UI_SENSITIVE_WIDGETS = {"IDDMLoadPrivatePhotos": {0: "folder"}, "IDDMTrain": {4: "lora_name", 16: "lora_name"},
                        "IDDMLoadProtectedLoRA": {0: "lora_name"}, "LoraLoader": {0: "lora_name"},
                        "LoraLoaderModelOnly": {0: "lora_name"}}
# Load Protected LoRA's list entry for "the connected LoRA" (nodes/spec.py CONNECTED_LORA): no name.
CONNECTED_LORA = "(connected from IDDM Train)"
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class Finding:
    where: str  # e.g. "PNG tEXt 'prompt' > node 2 (IDDMLoadPrivatePhotos).folder"
    kind: str  # a key of KINDS
    value: str
    file: str = ""  # the audited file, as given (shown on the user's own terminal only)

    @property
    def why(self) -> str:
        return KINDS[self.kind]


@dataclass
class AuditResult:
    files_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    @property
    def clean(self) -> bool:
        return not self.findings and not self.skipped


# --------------------------------------------------------------------------------- entry points

def audit(path: Path) -> AuditResult:
    """Audit one file, or every image, workflow, LoRA and HTML file under a folder; the folder's
    other files, and hidden ones, are listed in `skipped` (not checked) with the reason."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give the file or folder to check.")
    result = AuditResult()
    files = [path] if path.is_file() else _folder_files(path, result.skipped)
    for file in files:
        try:
            found = audit_bytes(_read_for_audit(file))
        except (ValueError, OSError) as error:
            result.skipped.append((str(file), str(error)))
            continue
        result.files_checked += 1
        result.findings.extend(replace(f, file=str(file)) for f in found)
    return result


def _folder_files(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """The audited files under `folder`; the others go to `skipped` (a hidden folder as one entry)."""
    files, hidden = [], {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        parts = p.relative_to(folder).parts
        first_hidden = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
        if first_hidden is not None:
            top = folder.joinpath(*parts[:first_hidden + 1])
            hidden[top] = hidden.get(top, 0) + 1
        elif p.suffix.lower() in AUDITED_SUFFIXES:
            files.append(p)
        elif p.suffix.lower() in PICKLE_SUFFIXES:
            skipped.append((str(p), "a pickle-based model file: reading it safely is not possible (share "
                                    "models as .safetensors, which this audit reads)"))
        else:
            skipped.append((str(p), "not an image, workflow, LoRA (.safetensors) or HTML file"))
    for top, count in hidden.items():
        what = "hidden folder" if top.is_dir() else "hidden file"
        skipped.append((str(top), what + (f" ({count} files)" if top.is_dir() else "")))
    return files


def _read_for_audit(file: Path) -> bytes:
    """The file's bytes; of a .safetensors file only its header (the tensors can be gigabytes)."""
    with open(file, "rb") as f:
        head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":
            size = struct.unpack("<Q", head[:8])[0]
            if size <= MAX_SAFETENSORS_HEADER:
                return head + f.read(size - 1)
        return head + f.read()


def audit_bytes(data: bytes) -> list[Finding]:
    """Findings in one file's content: an image's metadata, or a JSON/text document."""
    findings = []
    for where, payload in _container_items(data):
        if isinstance(payload, bytes):  # an EXIF block
            findings.extend(exif_findings(payload, where))
        elif isinstance(payload, _LoraValue):
            findings.extend(lora_findings(payload.key, str(payload), where))
        else:
            findings.extend(scan_text(payload, where))
    return findings


def metadata_items(data: bytes) -> list[tuple[str, str]]:
    """(where, text) for every piece of text metadata in a PNG/JPEG/WebP image (EXIF values one by
    one), or the whole document for JSON/text files. ValueError for anything else."""
    items = []
    for where, payload in _container_items(data):
        items.extend(_exif_items(payload, where) if isinstance(payload, bytes) else [(where, payload)])
    return items


class _UnknownFormat(ValueError):
    """Data in none of the formats this audit reads (unlike a damaged file of one of them)."""


def _container_items(data: bytes) -> Iterator[tuple[str, str | bytes]]:
    """(where, text) or (where, EXIF block as bytes) in file order."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png_items(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_items(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_items(data)
    header = _safetensors_header(data)
    if header is not None:
        return _safetensors_items(header)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _UnknownFormat("not a PNG, JPEG or WebP image, a .safetensors file, nor a UTF-8 "
                             "text/JSON/HTML file") from None
    if _HTML_START.match(text):
        return _html_items(text)
    return iter([("file", text)])


# --------------------------------------------------------------------------------- image containers

# PNG chunks that hold no text (image data, colour, animation frames): not read.
_PNG_SILENT = {b"IHDR", b"PLTE", b"IDAT", b"pHYs", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"bKGD",
               b"tRNS", b"sBIT", b"hIST", b"sPLT", b"acTL", b"fcTL", b"fdAT", b"tIME", b"cICP",
               b"mDCv", b"cLLi"}
# PNG text chunks and the Pillow reader of each (ComfyUI's animated-PNG `comf` is laid out as tEXt).
_PNG_TEXT_LAYOUTS = {b"tEXt": b"tEXt", b"zTXt": b"zTXt", b"iTXt": b"iTXt", b"comf": b"tEXt"}


def _png_items(data: bytes) -> Iterator[tuple[str, str | bytes]]:
    for kind, body in _png_chunks(data):
        name = kind.decode("latin-1")
        texts = _png_texts(kind, body) if kind in _PNG_TEXT_LAYOUTS else {}
        if any(texts.values()):
            yield from ((f"PNG {name} '{key}'", text) for key, text in texts.items())
        elif kind == b"eXIf":
            yield "PNG eXIf", body
        elif kind not in _PNG_SILENT:  # private chunks, and text chunks Pillow cannot read: their text
            yield from _strings_item(body, f"PNG chunk '{name}'")


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(type, body) of each chunk before IEND, private ones too, as Pillow's chunk reader frames them.
    A file cut short gives its chunks up to the cut, the last one with the bytes it has."""
    file = io.BytesIO(data)
    file.seek(8)  # past the signature
    chunks = PngImagePlugin.ChunkStream(file)
    while True:
        start = file.tell()
        try:
            kind, body_start, length = chunks.read()
        except (struct.error, SyntaxError):
            if len(data) - start < 8:  # the file ends here
                return
            raise ValueError(f"a damaged PNG: no chunk starts at byte {start}") from None
        if kind == b"IEND":
            return
        yield kind, data[body_start:body_start + length]
        file.seek(body_start + length + 4)  # past the body and its CRC (not checked: the text is read anyway)


def _png_texts(kind: bytes, body: bytes) -> dict[str, str]:
    """{keyword: text} of one text chunk as Pillow reads it, decompressed up to Pillow's limit against
    decompression bombs (PngImagePlugin.MAX_TEXT_CHUNK); {} if Pillow cannot read it."""
    reader = PngImagePlugin.PngStream(io.BytesIO(body))
    try:
        reader.call(_PNG_TEXT_LAYOUTS[kind], 0, len(body))
    except SyntaxError:  # an unknown compression method
        return {}
    except ValueError as error:  # over the limit: the image is not checked
        raise ValueError(f"a PNG {kind.decode('latin-1')} chunk holds more text than Pillow reads safely "
                         f"({error}); to publish the image, save it again without metadata (IDDM Save "
                         "Public Image)") from None
    return reader.im_text


_XMP = b"http://ns.adobe.com/xap/1.0/\0"
# Extended XMP: after the name, a 32-byte GUID, the full length and this part's offset (4 bytes each).
_EXTENDED_XMP = b"http://ns.adobe.com/xmp/extension/\0"
# JPEG segments that hold no text: JFIF's density, the ICC colour profile.
_JPEG_SILENT = {"APP0": (b"JFIF\0", b"JFXX\0"), "APP2": (b"ICC_PROFILE\0",)}


def _jpeg_items(data: bytes) -> Iterator[tuple[str, str | bytes]]:
    for marker, body in _jpeg_segments(data):
        if marker == "COM":
            yield "JPEG comment", body.decode("utf-8", "replace")
        elif marker == "APP1" and body.startswith(b"Exif\0"):
            yield "JPEG EXIF", body
        elif marker == "APP1" and body.startswith(_XMP):
            yield "JPEG XMP", body[len(_XMP):].decode("utf-8", "replace")
        elif marker == "APP1" and body.startswith(_EXTENDED_XMP):
            yield "JPEG extended XMP", body[len(_EXTENDED_XMP) + 40:].decode("utf-8", "replace")
        elif not body.startswith(_JPEG_SILENT.get(marker, ())):  # other APPn (IPTC, maker data): their text
            yield from _strings_item(body, f"JPEG {marker}")


def _jpeg_segments(data: bytes) -> list[tuple[str, bytes]]:
    """(marker name, body) of the APPn and COM segments, in file order, as Pillow reads them when it
    opens a JPEG. Opened directly rather than with Image.open, whose limit on the pixel count is
    for decoding: only the header is read here."""
    try:
        with JpegImagePlugin.JpegImageFile(io.BytesIO(data)) as image:
            return image.applist
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"a damaged or truncated JPEG: Pillow cannot read its header ({error})") from None


# WebP chunks of the image itself; any other may hold text.
_WEBP_SILENT = {b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM", b"ANMF", b"ICCP"}


def _webp_items(data: bytes) -> Iterator[tuple[str, str | bytes]]:
    """Pillow reads WebP through libwebp, which hands over EXIF, XMP and ICC but no other chunk:
    so the RIFF chunks are walked here, to read the text of unknown ones too."""
    pos = 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        pos += 8 + size + (size & 1)
        if kind == b"EXIF":
            yield "WebP EXIF", body
        elif kind == b"XMP ":
            yield "WebP XMP", body.decode("utf-8", "replace")
        elif kind not in _WEBP_SILENT:
            yield from _strings_item(body, f"WebP chunk '{kind.decode('latin-1')}'")


def _strings_item(data: bytes, where: str) -> Iterator[tuple[str, str]]:
    """Runs of 6+ printable characters, like `strings`: text hidden in unknown binary blocks."""
    runs = re.findall(rb"[\x20-\x7e]{6,}", data)
    if runs:
        yield where, "\n".join(r.decode("ascii") for r in runs)


# --------------------------------------------------------------------------------- LoRA files and HTML

def _safetensors_header(data: bytes) -> dict | None:
    """The JSON header of a .safetensors file (8-byte little-endian length, then JSON), or None."""
    if len(data) < 10 or data[8:9] != b"{":
        return None
    size = struct.unpack("<Q", data[:8])[0]
    if size > len(data) - 8:
        return None
    try:
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return header if isinstance(header, dict) else None


# kohya's training scripts: JSON objects whose KEYS are the training-data folders ("10_anna").
_DATASET_FOLDER_KEYS = {"ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency"}
# Names given to the LoRA by its maker (they travel with the file).
_NAME_KEYS = {"ss_output_name", "modelspec.title", "name", "ss_training_comment"}
# Hashes of the model itself or of the base model (they identify no photo).
_MODEL_HASH_KEYS = {"sshs_model_hash", "sshs_legacy_hash", "ss_sd_model_hash", "ss_new_sd_model_hash",
                    "ss_vae_hash", "ss_new_vae_hash", "modelspec.hash_sha256", "modelspec.hash_legacy"}
_HASH = re.compile(r"(?<![0-9a-fA-F])(?:[0-9a-f]{32,128}|[0-9A-F]{32,128})(?![0-9a-fA-F])")


def _safetensors_items(header: dict) -> Iterator[tuple[str, str]]:
    """Each metadata value as (where, text); LoRA-specific findings are made by lora_findings."""
    metadata = header.get("__metadata__")
    for key, value in (metadata.items() if isinstance(metadata, dict) else ()):
        yield f"LoRA metadata '{key}'", _LoraValue(str(value), str(key))


class _LoraValue(str):
    """A LoRA metadata value that remembers its key (audit_bytes routes it to lora_findings)."""

    def __new__(cls, text: str, key: str) -> "_LoraValue":
        value = super().__new__(cls, text)
        value.key = key
        return value


def lora_findings(key: str, value: str, where: str) -> list[Finding]:
    """One LoRA metadata value: paths and photo names as anywhere, plus what kohya-style metadata
    carries: training-data folder names, non-neutral output names, hashes of files."""
    findings = scan_text(value, where)
    document = _as_json(value)
    if key in _DATASET_FOLDER_KEYS and isinstance(document, dict):
        for folder in document:
            hits = scan_string(str(folder), f"{where} > {folder}", whole_value=True)
            findings += hits or [Finding(f"{where} > {folder}", "private_folder", str(folder))]
    if isinstance(document, dict):  # other keys of nested objects (tags, file names) may be paths too
        findings += [hit for name in _json_keys(document) for hit in scan_string(name, f"{where} > {name}")]
    if key in _NAME_KEYS and value.strip() and not findings and not is_neutral_lora_name(value.strip()):
        findings.append(Finding(where, "lora_name", value.strip()))
    if key not in _MODEL_HASH_KEYS:
        findings += [Finding(where, "file_hash", m.group(0)) for m in _HASH.finditer(value)]
    return findings


def _json_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _json_keys(value)
    elif isinstance(node, list):
        for value in node:
            yield from _json_keys(value)


_HTML_START = re.compile(r"\s*(?:<!doctype html|<html|<head|<body)", re.I)
_DATA_IMAGE = re.compile(r"data:image/[a-z+.-]+;base64,([A-Za-z0-9+/=\s]+)", re.I)


def _html_items(text: str) -> Iterator[tuple[str, str | bytes]]:
    """The page's text, and the metadata of each image embedded in it as a data: URI."""
    import base64
    import binascii

    yield "HTML", text
    for number, match in enumerate(_DATA_IMAGE.finditer(text), start=1):
        try:
            image = base64.b64decode(re.sub(r"\s+", "", match.group(1)), validate=True)
        except (binascii.Error, ValueError):
            continue
        try:
            for where, payload in _container_items(image):
                yield f"HTML embedded image {number} > {where}", payload
        except _UnknownFormat:  # e.g. a GIF: none of the metadata this audit reads
            continue
        except ValueError as error:  # a damaged image: the page is not checked
            raise ValueError(f"HTML embedded image {number}: {error}") from None


# --------------------------------------------------------------------------------- EXIF

_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_USER_COMMENT, _MAKER_NOTE = 0x9286, 0x927C
_XP_TAGS = range(0x9C9B, 0x9CA0)  # Windows XPTitle/Comment/Author/Keywords/Subject (UTF-16)
_PERSONAL_TAGS = {0x013B: "Artist", 0x9C9D: "XPAuthor", 0xA430: "CameraOwnerName",
                  0xA431: "BodySerialNumber"}


def _load_exif(tiff: bytes):
    """An EXIF block, with or without its 'Exif\\0\\0' header (Pillow skips it)."""
    exif = Image.Exif()
    exif.load(tiff)
    return exif


def _exif_values(tiff: bytes) -> Iterator[tuple[int, Any]]:
    exif = _load_exif(tiff)
    yield from exif.items()
    yield from exif.get_ifd(_EXIF_IFD).items()


def _exif_items(tiff: bytes, where: str) -> Iterator[tuple[str, str]]:
    try:
        values = list(_exif_values(tiff))
    except Exception:  # malformed EXIF: fall back to its readable bytes
        yield from _strings_item(tiff, where)
        return
    for tag, value in values:
        text = _exif_text(tag, value)
        if text:
            yield f"{where} {TAGS.get(tag, hex(tag))}", text


def _exif_text(tag: int, value: Any) -> str | None:
    if tag == _MAKER_NOTE:
        return None  # camera-private binary
    if isinstance(value, tuple) and value and all(isinstance(v, int) and 0 <= v < 256 for v in value):
        value = bytes(value)
    if isinstance(value, str):
        return value.strip("\0 ")
    if not isinstance(value, bytes):
        return None
    if tag in _XP_TAGS:
        return value.decode("utf-16-le", "replace").strip("\0 ")
    if tag == _USER_COMMENT:
        charset, body = value[:8], value[8:]
        encoding = "utf-16" if charset.startswith(b"UNICODE") else "latin-1"
        return body.decode(encoding, "replace").strip("\0 ")
    return value.decode("latin-1").strip("\0 ") if value.isascii() else None


def exif_findings(tiff: bytes, where: str) -> list[Finding]:
    """Paths and names in an EXIF block's text values, plus GPS positions and author/owner/serial
    tags (reported because of the tag itself, whatever its value)."""
    findings = [hit for at, text in _exif_items(tiff, where) for hit in scan_text(text, at)]
    try:
        exif = _load_exif(tiff)
        gps = exif.get_ifd(_GPS_IFD)
        tags = {**dict(exif.items()), **dict(exif.get_ifd(_EXIF_IFD).items())}
    except Exception:
        return findings
    if gps.get(2) and gps.get(4):
        findings.append(Finding(f"{where} GPS", "gps_location",
                                f"{_degrees(gps[2], gps.get(1))}, {_degrees(gps[4], gps.get(3))}"))
    for tag, name in _PERSONAL_TAGS.items():
        text = _exif_text(tag, tags.get(tag))
        if text:
            findings.append(Finding(f"{where} {name}", "personal_tag", text))
    return findings


def _degrees(dms, ref) -> str:
    try:
        value = float(dms[0]) + float(dms[1]) / 60 + float(dms[2]) / 3600
    except (TypeError, ValueError, IndexError, ZeroDivisionError):
        return str(dms)
    return f"{value:.5f}{ref or ''}"


# --------------------------------------------------------------------------------- text and JSON

_WINDOWS_PATH = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]:[\\/][^\s\"'<>|*?]*|\\\\[^\s\\\"'<>|*?]+\\[^\s\"'<>|*?]*")
_POSIX_PATH = re.compile(r"(?<![\w.~:/\\#-])/(?:[^\s/\\\"'<>|*?:]+/)+[^\s/\\\"'<>|*?:]*")
_TILDE_PATH = re.compile(r"(?<![\w/\\])~[\w.-]*[\\/][^\s\"'<>|*?]*")
_FILE_URL = re.compile(r"file://[^\s\"'<>]+", re.I)
_OTHER_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s\"'<>]*", re.I)
_PHOTO_SUFFIX = r"\.(?:jpe?g|jpe|jfif|png|webp|heic|heif|avif|tiff?|bmp|gif|dng|cr2|cr3|nef|arw|orf|rw2|raf)"
_PHOTO_NAME = re.compile(
    r"(?<![\w.-])[\w][\w.()+,&'-]*(?: \(\d+\))?" + _PHOTO_SUFFIX + r"(?![\w])|\b(?:IMG|DSC[NF]?|PXL|MVIMG|VID)[_-]?\d{3,}[\w-]*",
    re.I)
# A whole value that is one file name may contain spaces ("WhatsApp Image 2024-01-01 (1).jpeg").
_WHOLE_PHOTO_NAME = re.compile(r"[^\s/\\:*?\"<>|][^/\\:*?\"<>|\n]{0,200}" + _PHOTO_SUFFIX, re.I)
# ComfyUI names what it saves <prefix>_<5-digit counter>_.<ext>: generated images, not photos.
_COMFY_OUTPUT = re.compile(r"_\d{5,}_\.(?:png|jpe?g|webp)$", re.I)
# Embedded pictures (base64, data: URIs) are data, not paths: their '/' would look like one.
_BASE64 = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")
_HOME = [re.compile(p, re.I) for p in (
    r"^(?:/var)?/home/([^/]+)", r"^/Users/([^/]+)", r"^/mnt/[a-z]/Users/([^/]+)",
    r"^[a-z]:/(?:Users|Documents and Settings)/([^/]+)", r"^/(root)(?:/|$)", r"^~([^/]*)")]


def home_user(path: str) -> str | None:
    """The account a path belongs to ('' for ~), or None if it is not in a home folder."""
    normal = path.replace("\\", "/")
    if normal.lower().startswith("file://"):
        normal = normal[7:]
    for pattern in _HOME:
        match = pattern.match(normal)
        if match:
            return match.group(1)
    return None


def scan_string(text: str, where: str, whole_value: bool = False) -> list[Finding]:
    """Paths and photo file names in one piece of text. `whole_value`: the text is one value (a
    JSON string), so all of it may be one file name with spaces."""
    findings, spans = [], []
    without_urls = _OTHER_URL.sub(lambda m: m.group(0) if m.group(0).lower().startswith("file:")
                                  else " " * len(m.group(0)), text)
    without_urls = _BASE64.sub(lambda m: " " * len(m.group(0)), without_urls)
    for pattern in (_FILE_URL, _WINDOWS_PATH, _TILDE_PATH, _POSIX_PATH):
        for match in pattern.finditer(without_urls):
            if any(s <= match.start() < e for s, e in spans):
                continue
            spans.append(match.span())
            value = match.group(0).rstrip(".,;)")
            kind = "home_dir" if home_user(value) is not None else "absolute_path"
            findings.append(Finding(where, kind, value))
    whole = text.strip()
    if whole_value and not findings and _WHOLE_PHOTO_NAME.fullmatch(whole):
        return [] if _COMFY_OUTPUT.search(whole) else [Finding(where, "photo_file_name", whole)]
    for match in _PHOTO_NAME.finditer(without_urls):
        if not any(s <= match.start() < e for s, e in spans) and not _COMFY_OUTPUT.search(match.group(0)):
            findings.append(Finding(where, "photo_file_name", match.group(0)))
    return findings


def scan_text(text: str, where: str) -> list[Finding]:
    """A metadata text: JSON (workflows, nested ones too) is read as JSON, anything else as free text."""
    document = _as_json(text)
    if document is None:
        return scan_string(text, where)
    special = {}
    _find_graphs(document, (), special)
    findings: list[Finding] = []
    _walk(document, (), where, special, findings)
    return findings


def _as_json(text: str) -> Any | None:
    stripped = text.strip()
    # ComfyUI's WebP EXIF values read "prompt:{...}" / "workflow:{...}".
    prefix = re.match(r"^\w{1,40}:(?=[{\[])", stripped)
    if prefix:
        stripped = stripped[prefix.end():]
    if not stripped.startswith(("{", "[")):
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        return None


def _walk(node: Any, path: tuple, where: str, special: dict, findings: list[Finding]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            _walk(value, path + (key,), where, special, findings)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _walk(value, path + (index,), where, special, findings)
    elif isinstance(node, str):
        label = f"{where} > {special[path][1]}" if path in special else _label(where, path)
        if _as_json(node) is not None:  # JSON inside a string (e.g. a report, an embedded workflow)
            findings.extend(scan_text(node, label))
            return
        hits = scan_string(node, label, whole_value=True)
        if not hits and path in special and special[path][0] is not None:
            hits = [Finding(label, special[path][0], node)]
        findings.extend(hits)


def _label(where: str, path: tuple) -> str:
    return where + "".join(f" > {p}" for p in path)


def _find_graphs(node: Any, path: tuple, special: dict) -> None:
    """Mark the sensitive values of workflow graphs anywhere in a JSON document:
    special[path] = (kind or None, readable location)."""
    if isinstance(node, dict):
        if _is_api_graph(node):
            _mark_api(node, path, special)
        if isinstance(node.get("nodes"), list):
            _mark_ui(node["nodes"], path + ("nodes",), special)
        for key, value in node.items():
            _find_graphs(value, path + (key,), special)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _find_graphs(value, path + (index,), special)


def _is_api_graph(node: dict) -> bool:
    return bool(node) and all(isinstance(v, dict) and "class_type" in v and isinstance(v.get("inputs"), dict)
                              for v in node.values())


def _mark_api(graph: dict, path: tuple, special: dict) -> None:
    for node_id, node in graph.items():
        kind_of_node = str(node["class_type"])
        for name, value in node["inputs"].items():
            if not isinstance(value, str):
                continue
            at = path + (node_id, "inputs", name)
            kind = _sensitive(kind_of_node, name, value)
            special[at] = (kind, f"node {node_id} ({kind_of_node}).{name}")


def _mark_ui(nodes: list, path: tuple, special: dict) -> None:
    for index, node in enumerate(nodes):
        if not isinstance(node, dict) or not isinstance(node.get("widgets_values"), list):
            continue
        kind_of_node = str(node.get("type", "?"))
        positions = UI_SENSITIVE_WIDGETS.get(kind_of_node, {})
        for slot, value in enumerate(node["widgets_values"]):
            if not isinstance(value, str):
                continue
            name = positions.get(slot, f"widget {slot}")
            kind = _sensitive(kind_of_node, name, value)
            special[path + (index, "widgets_values", slot)] = (
                kind, f"node {node.get('id', index)} ({kind_of_node}) {name}")


def _sensitive(node_type: str, input_name: str, value: str) -> str | None:
    """The kind of finding a widget value is by its role in the graph (None: nothing special)."""
    if not value.strip() or (node_type == "IDDMLoadProtectedLoRA" and value == CONNECTED_LORA):
        return None
    if node_type == "IDDMLoadPrivatePhotos" and input_name == "folder":
        return "private_folder"
    is_lora = input_name == "lora_name" or ("lora" in node_type.lower() and value.lower().endswith(MODEL_SUFFIXES))
    if is_lora and not is_neutral_lora_name(value):
        return "lora_name"
    return None
