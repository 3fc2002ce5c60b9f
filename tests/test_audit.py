"""`iddm audit`: what it finds in image metadata and workflow files, and what it leaves alone."""
from __future__ import annotations

import argparse
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

import pack_nodes
from comfyui_iddm import audit as audit_module
from comfyui_iddm.audit import audit, audit_bytes, metadata_items, scan_string
from comfyui_iddm.commands import audit as audit_command
from comfyui_iddm.public_image import encode_public_image

REPO = Path(__file__).resolve().parents[1]
NEUTRAL = "iddm_20261122_0a1b2c"


def api_graph(folder: str = "my_photos", lora: str = "anna_smith_lora") -> dict:
    """The train-and-generate graph in API format as ComfyUI embeds it (shape of the shipped one)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "IDDMLoadPrivatePhotos", "inputs": {"folder": folder, "resolution": 512,
                                                                "face_detector": "auto"}},
        "6": {"class_type": "IDDMTrain", "inputs": {"model": ["1", 0], "lora_name": lora, "rho": 0.3,
                                                    "instance_prompt": "a photo of sks person"}},
        "10": {"class_type": "IDDMLoadProtectedLoRA", "inputs": {"lora_name": "", "lora": ["6", 0]}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks person, 16:9, AC/DC"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ComfyUI"}},
    }


def ui_graph(folder: str = "my_photos", lora: str = "anna_smith_lora") -> dict:
    train_widgets = ["a photo of sks person", 0.3, 0.08, 0.03, 10, 8, 0.008, 20, 1e-4, 4, 4.0, 2, "0,200",
                     "auto", 0, "fixed", lora, False, "no", "auto", "a photo of person", 0.0]
    return {"nodes": [
        {"id": 2, "type": "IDDMLoadPrivatePhotos", "widgets_values": [folder, 512, "auto"]},
        {"id": 6, "type": "IDDMTrain", "widgets_values": train_widgets},
        {"id": 7, "type": "LoraLoader", "widgets_values": ["people/anna.safetensors", 1.0, 1.0]},
        {"id": 8, "type": "LoadImage", "widgets_values": ["IMG_20240101_120000.jpg", "image"]},
    ], "links": [], "extra": {"ds": {"scale": 1.0}}}


def png_bytes(info: PngInfo | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 60)).save(buffer, "PNG", pnginfo=info, **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def stock_png(api: dict, ui: dict) -> bytes:
    """What ComfyUI's stock Save Image writes: tEXt 'prompt' (API graph) and 'workflow' (UI graph)."""
    info = PngInfo()
    info.add_text("prompt", json.dumps(api))
    info.add_text("workflow", json.dumps(ui))
    return png_bytes(info)


def kinds(findings) -> list[tuple[str, str]]:
    return sorted((f.kind, f.value) for f in findings)


# ----------------------------------------------------------------------------- stock ComfyUI images

def test_stock_png_reports_folder_lora_paths_and_photo_names():
    api = api_graph("/home/anna/Pictures/private set", "anna_smith_lora")
    found = audit_bytes(stock_png(api, ui_graph("my_photos", "anna_smith_lora")))
    assert kinds(found) == sorted([
        ("home_dir", "/home/anna/Pictures/private"),  # from the prompt (the path stops at the space)
        ("lora_name", "anna_smith_lora"),  # prompt: IDDM Train
        ("private_folder", "my_photos"),  # workflow: Load Private Photos, widget 0
        ("lora_name", "anna_smith_lora"),  # workflow: IDDM Train, widget 16
        ("lora_name", "people/anna.safetensors"),  # workflow: LoraLoader, widget 0
        ("photo_file_name", "IMG_20240101_120000.jpg"),  # workflow: LoadImage
    ])
    where = {f.value: f.where for f in found if f.kind != "lora_name"}
    assert where["/home/anna/Pictures/private"] == "PNG tEXt 'prompt' > node 2 (IDDMLoadPrivatePhotos).folder"
    assert where["my_photos"] == "PNG tEXt 'workflow' > node 2 (IDDMLoadPrivatePhotos) folder"
    assert audit_module.home_user("/home/anna/Pictures/private") == "anna"


def test_neutral_graph_reports_only_the_folder_name():
    found = audit_bytes(stock_png(api_graph("my_photos", NEUTRAL), {"nodes": []}))
    assert kinds(found) == [("private_folder", "my_photos")]
    found = audit_bytes(stock_png(api_graph("my_photos", NEUTRAL + ".safetensors"), {"nodes": []}))
    assert kinds(found) == [("private_folder", "my_photos")]


def test_compressed_and_international_text_chunks_and_comf_chunks():
    info = PngInfo()
    info.add_text("prompt", json.dumps(api_graph("/Users/zoë/photos/x", NEUTRAL)), zip=True)  # zTXt
    info.add_itxt("workflow", json.dumps(ui_graph("fotos_zoë", NEUTRAL)), zip=True)  # compressed iTXt
    info.add_itxt("note", "saved from D:\\Users\\Zoë\\Desktop\\me.webp")  # plain iTXt
    info.add(b"comf", b"prompt\0" + json.dumps(api_graph("set", NEUTRAL)).encode())  # animated PNG style
    found = audit_bytes(png_bytes(info))
    values = {(f.kind, f.value) for f in found}
    assert ("home_dir", "/Users/zoë/photos/x") in values
    assert ("private_folder", "fotos_zoë") in values
    assert ("home_dir", "D:\\Users\\Zoë\\Desktop\\me.webp") in values
    assert ("private_folder", "set") in values
    assert {f.where.split(" >")[0] for f in found} >= {"PNG zTXt 'prompt'", "PNG iTXt 'workflow'",
                                                        "PNG comf 'prompt'"}


def exif_with_everything() -> Image.Exif:
    exif = Image.Exif()
    exif[0x013B] = "Anna Smith"  # Artist
    exif[0x010E] = "C:\\Users\\anna\\Pictures\\DSC01234.JPG"  # ImageDescription
    exif[0x8825] = {1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 0.0)}  # GPS
    exif[0x8769] = {0x9286: b"ASCII\0\0\0from /home/anna/shoot/IMG_0042.HEIC"}  # UserComment
    return exif


def test_exif_in_jpeg_png_and_webp():
    image = Image.new("RGB", (8, 8))
    for fmt in ("JPEG", "PNG", "WEBP"):
        buffer = io.BytesIO()
        image.save(buffer, fmt, exif=exif_with_everything())
        found = kinds(audit_bytes(buffer.getvalue()))
        assert found == sorted([("personal_tag", "Anna Smith"), ("gps_location", "52.52000N, 13.40000E"),
                                ("home_dir", "C:\\Users\\anna\\Pictures\\DSC01234.JPG"),
                                ("home_dir", "/home/anna/shoot/IMG_0042.HEIC")]), fmt


def test_comfyui_webp_exif_prompt_and_workflow():
    """ComfyUI's WebP savers put 'prompt:{json}' in EXIF Model and 'workflow:{json}' in Make."""
    exif = Image.Exif()
    exif[0x0110] = "prompt:" + json.dumps(api_graph("my_photos", "lora_of_anna"))
    exif[0x010F] = "workflow:" + json.dumps(ui_graph("my_photos", NEUTRAL))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "WEBP", exif=exif)
    found = audit_bytes(buffer.getvalue())
    assert ("lora_name", "lora_of_anna") in kinds(found)
    assert any(f.where.startswith("WebP EXIF Model > node 2") for f in found)


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def test_jpeg_xmp_and_comment_and_app13():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    plain = buffer.getvalue()
    xmp = (b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><xmpMM:DerivedFrom stRef:filePath="
           b"\"/Users/anna/Desktop/anna_beach.png\"/></x:xmpmeta>")
    extra = (jpeg_segment(0xE1, xmp) + jpeg_segment(0xFE, b"exported IMG_7781.jpg")
             + jpeg_segment(0xED, b"Photoshop 3.0\0\x1c\x02\x05\0\x10~/private/set1/x"))
    found = kinds(audit_bytes(plain[:2] + extra + plain[2:]))
    assert found == sorted([("home_dir", "/Users/anna/Desktop/anna_beach.png"),
                            ("photo_file_name", "IMG_7781.jpg"), ("home_dir", "~/private/set1/x")])


def test_webp_xmp_chunk():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "WEBP", xmp=b"<x:xmpmeta>/home/bob/faces/bob.jpg</x:xmpmeta>")
    assert kinds(audit_bytes(buffer.getvalue())) == [("home_dir", "/home/bob/faces/bob.jpg")]


def test_unknown_png_chunk_text_is_read():
    body = b"\0\1\2saved by a tool from /media/usb/people/anna/portrait.png\0\3"
    data = png_bytes()
    data = data[:33] + png_chunk(b"prVt", body) + data[33:]  # after IHDR
    assert kinds(audit_bytes(data)) == [("absolute_path", "/media/usb/people/anna/portrait.png")]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_public_images_carry_nothing(fmt):
    pixels = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    data = encode_public_image(pixels, fmt, 90)
    assert metadata_items(data) == [] and audit_bytes(data) == []


def test_truncated_and_damaged_images_do_not_crash():
    data = stock_png(api_graph("/home/anna/x/y", NEUTRAL), {"nodes": []})
    for cut in (20, 60, len(data) // 2):
        audit_bytes(data[:cut])  # no exception
    info = PngInfo()
    info.add_text("k", "x" * 10, zip=True)
    damaged = bytearray(png_bytes(info))
    start = damaged.find(b"zTXt") + 8
    damaged[start:start + 4] = b"\xff\xff\xff\xff"
    audit_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="not a PNG"):
        audit_bytes(b"\x00\x01\x02\xff\xfe binary")


def test_every_text_chunk_is_read_not_only_what_image_info_keeps():
    """Image.info keeps one text per keyword and none after the pixels: the audit reads every chunk."""
    data = png_bytes()
    after_pixels = data.rindex(b"IEND") - 4
    data = (data[:33] + png_chunk(b"tEXt", b"note\0/home/ann/first/x")
            + data[33:after_pixels] + png_chunk(b"tEXt", b"note\0/home/bob/second/y") + data[after_pixels:])
    assert kinds(audit_bytes(data)) == [("home_dir", "/home/ann/first/x"), ("home_dir", "/home/bob/second/y")]


def test_images_pillow_cannot_read_are_listed_as_not_checked(tmp_path):
    import base64

    from PIL import PngImagePlugin

    bomb = PngInfo()
    bomb.add_text("prompt", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)  # over Pillow's limit
    (tmp_path / "bomb.png").write_bytes(png_bytes(bomb))
    damaged = png_bytes()
    (tmp_path / "damaged.png").write_bytes(damaged[:33] + b"\0\0\0\5\1\2\3\4" + damaged[33:])
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=exif_with_everything())
    cut = buffer.getvalue()[:buffer.getvalue().index(b"Exif") + 20]
    (tmp_path / "cut.jpg").write_bytes(cut)
    (tmp_path / "page.html").write_text(f'<html><img src="data:image/jpeg;base64,{base64.b64encode(cut).decode()}">')
    result = audit(tmp_path)
    reasons = {Path(file).name: reason for file, reason in result.skipped}
    assert result.files_checked == 0 and result.findings == []
    assert set(reasons) == {"bomb.png", "damaged.png", "cut.jpg", "page.html"}
    assert "more text than Pillow reads safely" in reasons["bomb.png"]
    assert "IDDM Save Public Image" in reasons["bomb.png"]  # what to do
    assert reasons["damaged.png"] == "a damaged PNG: no chunk starts at byte 33"
    assert reasons["cut.jpg"].startswith("a damaged or truncated JPEG: Pillow cannot read its header")
    assert reasons["page.html"] == "HTML embedded image 1: " + reasons["cut.jpg"]


# ----------------------------------------------------------------------------- text and JSON

@pytest.mark.parametrize("text, expected", [
    ("see /home/bob/x/IMG_1234.JPG", [("home_dir", "/home/bob/x/IMG_1234.JPG")]),
    ("C:\\Users\\Carol\\Desktop\\me.png", [("home_dir", "C:\\Users\\Carol\\Desktop\\me.png")]),
    ("file:///Users/dan/p/q.jpg", [("home_dir", "file:///Users/dan/p/q.jpg")]),
    ("/mnt/c/Users/erin/Pictures/a", [("home_dir", "/mnt/c/Users/erin/Pictures/a")]),
    ("/srv/data/set", [("absolute_path", "/srv/data/set")]),
    ("\\\\nas\\photos\\anna", [("absolute_path", "\\\\nas\\photos\\anna")]),
    ("holiday_2023.jpeg and PXL_20230101_123456789", [("photo_file_name", "PXL_20230101_123456789"),
                                                      ("photo_file_name", "holiday_2023.jpeg")]),
    ("https://example.com/models/x/y.png and hf://org/repo/a.png", []),
    ("16:9, AC/DC, 1/2/3, a photo of sks person, 0,200, euler", []),
    ("v1-5-pruned-emaonly.safetensors", []),
    ("ComfyUI_00012_.png, portrait_temp_abcde_00001_.webp", []),  # ComfyUI's own output names
    ("ComfyUI_263067_.png", []),
    ("see image (12).png here", [("photo_file_name", "image (12).png")]),
    ("a photo of sks person.png and more", [("photo_file_name", "person.png")]),
    ("#/definitions/x and " + "/9j/4AAQSkZJRg" + "ABAQ+/" * 60, []),  # JSON refs, base64 pictures
])
def test_scan_string(text, expected):
    assert kinds(scan_string(text, "t")) == sorted(expected)


def test_json_inside_strings_and_history_dumps():
    """A /history entry nests the API graph in a list; a report may hold JSON inside a string."""
    history = {"abc": {"prompt": [0, "abc", api_graph("my_photos", "anna_lora"), {}, ["12"]],
                       "outputs": {"6": {"report": [json.dumps({"photos": ["/home/anna/a/b.jpg"]})]}}}}
    found = kinds(scan_text_file(json.dumps(history)))
    assert found == sorted([("private_folder", "my_photos"), ("lora_name", "anna_lora"),
                            ("home_dir", "/home/anna/a/b.jpg")])


def test_a_whole_value_may_be_a_file_name_with_spaces():
    found = audit_bytes(json.dumps({"image": "WhatsApp Image 2024-01-01 (1).jpeg"}).encode())
    assert kinds(found) == [("photo_file_name", "WhatsApp Image 2024-01-01 (1).jpeg")]


def scan_text_file(text: str):
    return audit_bytes(text.encode())


def _widget_slots(node) -> list[str]:
    slots = []
    for port in [p for p in node.inputs if not p.optional] + [p for p in node.inputs if p.optional]:
        if port.is_widget:
            slots.append(port.name)
            if port.seed:
                slots.append("control_after_generate")
    return slots


def test_ui_widget_positions_match_the_node_declarations():
    """The positions audit.py reads in UI-format workflows are those of the nodes' widgets (IDDM
    Train: of its current layout or of pack 0.1's)."""
    spec = pack_nodes.load("spec")
    layouts = {node.node_id: [_widget_slots(node)] for node in spec.ALL_NODES}
    layouts["IDDMTrain"].append(list(spec.LEGACY_TRAIN_WIDGETS))
    for node_type, positions in audit_module.UI_SENSITIVE_WIDGETS.items():
        if node_type not in layouts:  # a stock node: lora_name is its first widget in ComfyUI
            assert positions == {0: "lora_name"}
            continue
        for index, name in positions.items():
            assert any(index < len(slots) and slots[index] == name for slots in layouts[node_type]), \
                (node_type, index, layouts[node_type])
    # Where one layout has lora_name, the other has no widget or a number: never misread as a name.
    current, legacy = layouts["IDDMTrain"]
    assert len(current) <= 16 and spec.TRAIN.input(legacy[current.index("lora_name")]).type == "INT"
    assert audit_module.CONNECTED_LORA == spec.CONNECTED_LORA


def test_shipped_workflows_hold_no_paths_photo_names_or_personal_lora_names():
    files = sorted((REPO / "workflows").rglob("*.json"))
    if not files:
        pytest.skip("no workflow files in workflows/")
    found = [f for path in files for f in audit_bytes(path.read_bytes())]
    # the placeholder folder names users replace (the person; other people, for anti-personalization)
    allowed = {("private_folder", "my_photos"), ("private_folder", "other_people")}
    assert [(f.kind, f.value, f.where) for f in found if (f.kind, f.value) not in allowed] == []


# ----------------------------------------------------------------------------- folders and the command

def run_audit(*argv: str) -> tuple[int, str]:
    import contextlib
    parser = argparse.ArgumentParser(prog="iddm")
    audit_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["audit", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = args.func(args)
    return code, out.getvalue()


def test_folder_audit_and_exit_codes(tmp_path):
    leaky = tmp_path / "out" / "ComfyUI_00001_.png"
    leaky.parent.mkdir()
    leaky.write_bytes(stock_png(api_graph("/home/anna/faces", "anna_lora"), {"nodes": []}))
    clean = tmp_path / "out" / "portrait_00001_.png"
    clean.write_bytes(encode_public_image(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "out" / ".hidden.json").write_text('{"a": "/home/anna/x/y"}')
    (tmp_path / "out" / "notes.txt").write_text("/home/anna/x/y")  # not an audited kind of file

    result = audit(tmp_path)
    assert result.files_checked == 2 and {f.file for f in result.findings} == {str(leaky)}

    code, out = run_audit(str(tmp_path))
    assert code == 1
    assert "(account 'anna')" in out and "anna_lora" in out and "IDDM Save Public Image" in out
    assert "2 file(s) checked; 2 finding(s) in 1 file(s)" in out

    code, out = run_audit(str(clean))
    assert code == 0 and out.strip() == "1 file(s) checked; nothing found"
    code, out = run_audit(str(clean), "--json")
    assert code == 0 and json.loads(out) == {"files_checked": 1, "findings": [], "skipped": []}

    code, out = run_audit(str(leaky), "--json")
    document = json.loads(out)
    assert code == 1 and {f["kind"] for f in document["findings"]} == {"home_dir", "lora_name"}
    assert all(f["why"] and f["file"] == str(leaky) for f in document["findings"])

    broken = tmp_path / "broken.json"
    broken.write_bytes(b"\xff\xfe\x00binary")
    code, out = run_audit(str(broken))
    assert code == 2 and "not checked" in out
    with pytest.raises(FileNotFoundError):
        audit(tmp_path / "missing")


# ----------------------------------------------------------------------------- issue 13: fail loudly,
# list what was not checked, read LoRAs and HTML pages

def test_a_missing_path_or_a_folder_with_nothing_to_check_fails_loudly(tmp_path):
    from conftest import run_cli_here

    code, out, err = run_cli_here(["audit", str(tmp_path / "missing")])
    assert code == 2 and "does not exist" in err and "nothing found" not in out
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli_here(["audit", str(tmp_path / "empty")])
    assert code == 2 and "nothing to check" in err and "nothing found" not in out


def kohya_lora(path: Path, **metadata: str) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)}, str(path),
              metadata=metadata)
    return path


def test_lora_metadata_is_audited_names_folders_paths_and_hashes(tmp_path):
    digest = "3f" * 32
    lora = kohya_lora(
        tmp_path / "lora.safetensors", ss_output_name="anna_smith_v2", ss_network_dim="4",
        ss_dataset_dirs=json.dumps({"10_anna smith": {"n_repeats": 10, "img_count": 12}}),
        ss_tag_frequency=json.dumps({"10_anna smith": {"anna smith": 12, "IMG_1234.jpg": 1}}),
        ss_datasets=json.dumps([{"subsets": [{"image_dir": "/home/anna/photos/train"}]}]),
        sshs_model_hash="ab" * 32,  # the LoRA's own hash: names no photo
        ss_image_hashes=json.dumps({"img1": digest}))
    result = audit(lora)
    assert result.files_checked == 1
    assert kinds(result.findings) == sorted([
        ("lora_name", "anna_smith_v2"), ("private_folder", "10_anna smith"),
        ("private_folder", "10_anna smith"), ("photo_file_name", "IMG_1234.jpg"),
        ("home_dir", "/home/anna/photos/train"), ("file_hash", digest)])
    assert all(f.where.startswith("LoRA metadata '") for f in result.findings)


def test_an_iddm_lora_audits_clean_and_only_its_header_is_read(tmp_path, monkeypatch):
    import torch

    from comfyui_iddm.config import IDDMConfig
    from comfyui_iddm.lora_io import lora_metadata, save_lora

    path = tmp_path / "iddm_20261122_0a1b2c.safetensors"
    figures = {"decoupled": {"linf": 0.08, "psnr": 30.1, "ssim": 0.9}, "seconds_total": 10.0}
    save_lora(path, {"lora_unet_x.lora_down.weight": torch.zeros(256, 256)}, lora_metadata(IDDMConfig(), figures))
    reads = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if Path(file) == path:
            real_read = handle.read
            handle.read = lambda size=-1: reads.append(size) or real_read(size)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    result = audit(path)
    assert result.files_checked == 1 and result.findings == [] and result.skipped == []
    assert -1 not in reads  # the 256 KB of tensors were never read


def test_html_pages_and_the_images_embedded_in_them_are_audited(tmp_path):
    import base64

    leaky_png = stock_png(api_graph("my_photos", "anna_lora"), {"nodes": []})
    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><html><body><p>photos from /home/anna/Pictures/set/IMG_0001.jpg</p>"
                    f'<img src="data:image/png;base64,{base64.b64encode(leaky_png).decode()}"></body></html>')
    found = audit(page).findings
    assert ("home_dir", "/home/anna/Pictures/set/IMG_0001.jpg") in kinds(found)
    embedded = [f for f in found if f.where.startswith("HTML embedded image 1 > PNG tEXt 'prompt'")]
    assert {f.kind for f in embedded} == {"private_folder", "lora_name"}


def test_a_report_page_written_by_iddm_audits_clean(tmp_path):
    from comfyui_iddm.report import PLOT_NAMES, write_report_html

    report = {"config": {"rho": 0.3, "eta": 0.08, "recognizers": ["dlib_resnet"]},
              "iterations": [{"stage1_loss": [0.1], "stage2_score": [0.5], "ft_loss": [0.2, 0.1], "seconds": 1.0}],
              "identity": [{"recognizer": "dlib_resnet", "role": "surrogate", "before": 0.99, "after": 0.5}],
              "decoupled": {"linf": 0.08, "psnr": 30.0, "ssim": 0.9}, "seconds_total": 3.0}
    write_report_html(report, tmp_path)
    result = audit(tmp_path)
    assert result.files_checked == len(PLOT_NAMES) + 1 and result.findings == [] and result.skipped == []


def test_a_folder_lists_every_file_it_did_not_check(tmp_path):
    kohya_lora(tmp_path / "lora.safetensors", ss_output_name="anna")
    (tmp_path / "page.html").write_text("<html><body>/home/anna/x/y</body></html>")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04pickle")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "a.json").write_text("{}")
    (tmp_path / ".cache" / "b.json").write_text("{}")
    (tmp_path / ".env").write_text("X=1")
    result = audit(tmp_path)
    assert result.files_checked == 2  # the LoRA and the page
    assert {f.file for f in result.findings} == {str(tmp_path / "lora.safetensors"), str(tmp_path / "page.html")}
    skipped = dict(result.skipped)
    assert skipped == {
        str(tmp_path / "notes.txt"): "not an image, workflow, LoRA (.safetensors) or HTML file",
        str(tmp_path / "old.ckpt"): skipped[str(tmp_path / "old.ckpt")],
        str(tmp_path / ".cache"): "hidden folder (2 files)", str(tmp_path / ".env"): "hidden file"}
    assert "pickle" in skipped[str(tmp_path / "old.ckpt")]
    code, out = run_audit(str(tmp_path))
    assert code == 1
    assert f"{tmp_path / 'notes.txt'}: not checked: not an image" in out
    assert "2 file(s) checked; 2 finding(s) in 2 file(s); 4 not checked" in out
    (tmp_path / "lora.safetensors").unlink()
    (tmp_path / "page.html").unlink()
    code, out = run_audit(str(tmp_path))
    assert code == 2 and "0 file(s) checked; nothing found; 4 not checked" in out
