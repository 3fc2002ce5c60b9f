"""Against a real ComfyUI ($COMFYUI_PATH): the private photos in the default private-photos root are
out of reach of every HTTP route, and what ComfyUI keeps names no absolute path.

The server runs with no $IDDM_PRIVATE_ROOT and no settings file, so the pack uses its default root,
under $XDG_DATA_HOME (a temporary folder here). Its input folder is a temporary one that looks like
ComfyUI's own (a '3d' folder without images, an example image) plus photos a user left there; its
output/ and temp/ are its own; an extra loras folder (extra_model_paths) holds a model preview, the
control that the preview route works at all.

- First use: the root is made (readable by this account only) and the log says where, without an
  absolute path; the folder list says how to add a folder; queueing the list's hint is refused with
  what to do.
- Only folders that hold images are listed (not '3d'); photos left in input/ are not used unless the
  user points the root there on purpose, and then the node's report warns.
- After a run of the shipped train-and-generate graph on the default root, no route returns the
  photos: /view with every type, subfolder and annotation, the model preview route (which in ComfyUI
  0.3.64 serves any image it is given a path to; the pack confines it), /userdata, and every listing
  (/internal/files, /models, /experiment/models, /history, /internal/logs, ...) names no photo and
  no absolute path of the root.
- After each bad input (a taken LoRA name, missing recognizer weights, a broken LoRA file, photos
  without faces), /history holds no absolute path of the ComfyUI base, the private root or the home
  folder, except ComfyUI's own traceback lines naming its code files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfyui_fixtures as cf  # noqa: E402
import workflow_graphs as wg  # noqa: E402

COMFYUI = cf.comfyui_path()
pytestmark = cf.comfyui_marks("check the default private-photos root on a real ComfyUI")
linux_only = pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the default root follows XDG on Linux")

RUN = uuid.uuid4().hex[:6]
FOLDER = "set_r8"  # the relative name typed into the graph
NO_FACES = "set_r8_nofaces"
PHOTO_STEM = "zr8bob_private"  # distinctive, so any leak of a file name is found by search
LEGACY = "left_in_input"  # photos a user left in ComfyUI's input folder
WHERE = "$XDG_DATA_HOME/comfyui-iddm/photos"  # how the pack names the default root here (not under ~)


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The server's folders: data home (the default root goes there), config home (no settings file),
    an input folder like ComfyUI's with photos left in it, an extra loras folder with a preview."""
    top = tmp_path_factory.mktemp("default_root")
    folders = {name: top / name for name in ("data", "config", "input", "models", "log")}
    for folder in folders.values():
        folder.mkdir()
    (folders["input"] / "3d").mkdir()  # ComfyUI's own, without images
    legacy = [p.rename(p.with_name(f"{PHOTO_STEM}_legacy_{i}.jpg"))
              for i, p in enumerate(cf.make_face_photos(folders["input"] / LEGACY, 3))]
    Image.open(legacy[0]).save(folders["input"] / "example.png")  # what Load Image offers
    (folders["models"] / "loras").mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(folders["models"] / "loras" / f"probe_{RUN}.png")
    extra = top / "extra_model_paths.yaml"
    extra.write_text(f"iddm_test:\n  base_path: {folders['models']}\n  loras: loras\n")
    folders["extra"], folders["legacy"] = extra, legacy
    folders["root"] = folders["data"] / "comfyui-iddm" / "photos"
    return folders


@pytest.fixture(scope="module")
def server(place):
    from comfyui_iddm.private_root import ENV_ROOT

    cf.ensure_tiny_checkpoint(COMFYUI)
    env = {"XDG_DATA_HOME": str(place["data"]), "XDG_CONFIG_HOME": str(place["config"]), ENV_ROOT: None}
    server = cf.ComfyServer(COMFYUI, place["log"] / "comfyui.log", env=env, flags=(
        "--input-directory", str(place["input"]), "--extra-model-paths-config", str(place["extra"])))
    with cf.linked_into_custom_nodes(COMFYUI, {"comfyui-iddm": cf.REPO}):
        try:
            server.start()
            yield server
        finally:
            server.stop()
            for lora in cf.loras(f"iddm_test_{RUN}"):
                lora.unlink()


def folder_choices(server) -> list[str]:
    info = server.get("/object_info/IDDMLoadPrivatePhotos")["IDDMLoadPrivatePhotos"]
    return info["input"]["required"]["folder"][1]["options"]


def load_photos_graph(folder: str) -> dict:
    """Load Private Photos with its report shown by the stock Preview Any (so /history keeps it)."""
    return {"1": {"class_type": "IDDMLoadPrivatePhotos",
                  "inputs": {"folder": folder, "resolution": 64, "face_detector": "auto"}},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def refused(server, graph: dict) -> str:
    """The validation error text of a graph the server refuses to queue."""
    with pytest.raises(AssertionError, match=r"POST /prompt -> 400") as error:
        server.queue(graph)
    return str(error.value)


def shown_text(entry: dict, node_id: str = "2") -> str:
    return "".join(entry["outputs"][node_id]["text"])


@linux_only
def test_first_use_makes_the_default_root_and_says_where(server, place):
    root = place["root"]
    assert root.is_dir() and (root.stat().st_mode & 0o777) == 0o700
    made = [line for line in server.log().splitlines() if "[IDDM] private photos go in" in line]
    assert len(made) == 1 and WHERE in made[0] and str(place["data"]) not in made[0], made
    assert folder_choices(server) == [f"(no photo folder yet: add one to the default root, {WHERE})"]


@linux_only
def test_queueing_with_no_photo_folder_says_how_to_add_one(server, place):
    hint = folder_choices(server)[0]
    message = refused(server, load_photos_graph(hint))
    assert "no photo folder chosen" in message and WHERE in message and "press R" in message, message
    assert str(place["data"]) not in message
    assert message.count("Custom validation failed") == 1, message
    # With images connected the folder is not read, so its list entry does not matter.
    graph = load_photos_graph(hint)
    graph["3"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    graph["1"]["inputs"]["images"] = ["3", 0]
    entry = server.wait(server.queue(graph))
    assert entry["status"]["status_str"] == "success", cf.execution_errors(entry)
    assert shown_text(entry) == "1 photo(s) usable."


@linux_only
def test_photos_left_in_comfyui_input_are_used_only_when_the_root_points_there(server, place):
    assert LEGACY not in folder_choices(server) and "3d" not in folder_choices(server)
    message = refused(server, load_photos_graph(LEGACY))
    assert "ComfyUI's input folder (served at /view?type=input)" in message and "Move it into" in message
    assert "IDDM_PRIVATE_ROOT" in message and str(place["input"]) not in message, message

    settings = place["config"] / "comfyui-iddm" / "settings.json"
    settings.parent.mkdir()
    settings.write_text(json.dumps({"private_root": str(place["input"])}))  # on purpose
    try:
        assert folder_choices(server) == [LEGACY]  # '3d' holds no image
        entry = server.wait(server.queue(load_photos_graph(LEGACY)))
    finally:
        settings.unlink()
    assert entry["status"]["status_str"] == "success", cf.execution_errors(entry)
    report = shown_text(entry)
    assert report.startswith("Warning: these photos are in ComfyUI's input folder (served at /view?type=input)")
    assert f"the default root, {WHERE}" in report and "3 photo(s) usable." in report, report
    assert "[IDDM] Warning: these photos are in ComfyUI's input folder" in server.log()


@pytest.fixture(scope="module")
def run(server, place):
    """The shipped train-and-generate graph, scaled down, on photos in the default root, with Load
    Private Photos' report shown; and a folder of photos without faces beside them."""
    photos = [p.rename(p.with_name(f"{PHOTO_STEM}_{i}.jpg"))
              for i, p in enumerate(cf.make_face_photos(place["root"] / FOLDER, 6))]
    (place["root"] / NO_FACES).mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), (40 * i, 120, 200)).save(place["root"] / NO_FACES / f"{PHOTO_STEM}_noface_{i}.png")
        photos.append(place["root"] / NO_FACES / f"{PHOTO_STEM}_noface_{i}.png")
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    graph = cf.tiny_run(api, FOLDER, f"_{RUN}")
    loader = next(i for i, n in graph.items() if n["class_type"] == "IDDMLoadPrivatePhotos")
    graph["900"] = {"class_type": "PreviewAny", "inputs": {"source": [loader, 1]}}
    entry = cf.run_graph(server, graph)
    return entry, photos


@linux_only
def test_only_folders_with_images_are_listed_and_the_run_reports_no_warning(server, run):
    entry, _ = run
    assert folder_choices(server) == [FOLDER, NO_FACES]
    report = shown_text(entry, "900")
    assert report.startswith("6 photo(s) usable.") and "Warning" not in report, report


def served_routes(server) -> list[str]:
    """Every route of ComfyUI 0.3.64 that lists or serves files or keeps what ran, with and without /api."""
    kinds = server.get("/models")
    routes = ["/history", "/queue", "/object_info", "/embeddings", "/extensions", "/workflow_templates",
              "/settings", "/users", "/system_stats", "/features", "/models", "/experiment/models",
              "/internal/folder_paths", "/internal/logs", "/internal/logs/raw",
              *(f"/internal/files/{t}" for t in ("input", "output", "temp")),
              *(f"/models/{k}" for k in kinds), *(f"/experiment/models/{k}" for k in kinds),
              "/userdata?dir=.&recurse=true&full_info=true", "/userdata?dir=workflows&recurse=true",
              "/v2/userdata", "/v2/userdata?path=workflows"]
    return routes + ["/api" + r for r in routes]  # (/api/internal/... is no route in 0.3.64: asked anyway)


def test_no_http_route_returns_the_photos(server, place, run):
    _, photos = run
    photos = photos + place["legacy"]
    secrets = [p.name.encode() for p in photos] + [str(place["data"]).encode(), PHOTO_STEM.encode()]
    contents = {p.read_bytes() for p in photos}
    served, bodies = [], {}
    for route in served_routes(server):
        status, body = server.fetch(route)
        bodies[route] = body
        assert not [s for s in secrets if s in body], f"{route} names a photo or the root"
        assert not any(c in body for c in contents), f"{route} returns a photo"
    # Every file the listing routes offer, fetched: none is a photo.
    for kind in ("input", "output", "temp"):
        for name in json.loads(bodies[f"/internal/files/{kind}"]):
            status, body = server.fetch(f"/view?{urllib.parse.urlencode({'filename': name, 'type': kind})}")
            assert status == 200 and body not in contents
            served.append(name)
    assert "example.png" in served  # the listings were read (and ComfyUI does serve its input folder)

    for photo in photos:
        if photo in place["legacy"]:
            continue  # in the served input folder: served, as the control below shows
        relative = {kind: os.path.relpath(photo.parent, folder) for kind, folder in
                    (("input", place["input"]), ("output", server.output_dir), ("temp", server.temp_dir))}
        queries = [{"filename": photo.name, "subfolder": photo.parent.name, "type": t} for t in ("input", "output", "temp")]
        queries += [{"filename": photo.name, "subfolder": photo.parent.name},
                    {"filename": f"{photo.parent.name}/{photo.name} [input]"},
                    {"filename": str(photo)}, {"filename": str(photo), "type": "input"}]
        queries += [{"filename": photo.name, "subfolder": up, "type": kind} for kind, up in relative.items()]
        for prefix in ("/view", "/api/view"):
            for query in queries:
                status, body = server.fetch(f"{prefix}?{urllib.parse.urlencode(query)}")
                assert status != 200 and body not in contents, (prefix, query, status)
        if photo not in (photos[0], photos[-1]):
            continue  # the rest of the probes: one photo with a face, one without
        # ComfyUI 0.3.64's model preview route joins its file name to the model folder unchecked.
        stem = photo.with_suffix("")
        for kind, folders in ((f["name"], f["folders"]) for f in server.get("/experiment/models")):
            for index, folder in enumerate(folders):
                for name in (os.path.relpath(stem, folder), str(stem)):
                    route = f"/experiment/models/preview/{kind}/{index}/{urllib.parse.quote(name, safe='')}"
                    status, body = server.fetch(route)
                    assert status == 404, (route, status)
                    status, _ = server.fetch(route.replace("%2F", "/"))
                    assert status != 200, route
        for query in ({"dir": os.path.relpath(photo.parent, COMFYUI / "user" / "default")},):
            status, body = server.fetch(f"/userdata?{urllib.parse.urlencode(query)}")
            assert status != 200 or not [s for s in secrets if s in body], (query, status)

    # Controls: the same requests do return files where ComfyUI serves them.
    legacy = place["legacy"][0]
    status, body = server.fetch(f"/view?{urllib.parse.urlencode({'filename': legacy.name, 'subfolder': LEGACY, 'type': 'input'})}")
    assert status == 200 and body == legacy.read_bytes()
    loras = next(f["folders"] for f in server.get("/experiment/models") if f["name"] == "loras")
    index = loras.index(str(place["models"] / "loras"))
    status, _ = server.fetch(f"/experiment/models/preview/loras/{index}/probe_{RUN}")
    assert status == 200


def test_history_names_no_absolute_path_after_bad_inputs(server, place, run):
    entry, _ = run
    made = cf.loras(f"iddm_test_{RUN}")
    assert made, "the run saved a LoRA"
    api = json.loads((wg.WORKFLOWS / "api" / "iddm_train_and_generate.json").read_text())
    taken = cf.tiny_run(api, FOLDER, f"_{RUN}")  # same LoRA name again, overwrite off
    next(n for n in taken.values() if n["class_type"] == "IDDMTrain")["inputs"]["seed"] = 12345  # not cached
    missing_weights = cf.tiny_run(api, FOLDER, f"_{RUN}_w")
    for node in missing_weights.values():
        if node["class_type"] == "IDDMTrain":
            node["inputs"]["recognizers"] = "irse50"  # no weights for it on this machine
    broken = place["models"] / "loras" / f"broken_{RUN}.safetensors"
    broken.write_bytes(b"not a safetensors file")
    load_broken = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": cf.CHECKPOINT_NAME}},
        "2": {"class_type": "IDDMLoadProtectedLoRA", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": broken.name, "strength_model": 1.0,
            "strength_clip": 1.0}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}
    cases = {"LoRA name taken": (taken, f"models/loras/{made[0].name} already exists"),
             "missing recognizer weights": (missing_weights, "in models/facerecognition"),
             "broken LoRA file": (load_broken, f"<loras folder>/{broken.name} is not a readable"),
             "photos without faces": (load_photos_graph(NO_FACES), "photo 1")}
    forbidden = [str(COMFYUI), os.path.realpath(COMFYUI), str(place["root"]), str(place["data"]),
                 str(Path.home()) + "/"]
    try:
        for case, (graph, expected) in cases.items():
            failed = server.wait(server.queue(graph))
            assert failed["status"]["status_str"] == "error", case
            message = json.dumps([e["exception_message"] for e in cf.execution_errors(failed)])
            assert expected in message, (case, message)
            assert cf.absolute_paths_in(failed, forbidden) == [], case
            assert cf.absolute_paths_in(server.get(f"/history/{failed['prompt'][1]}"), forbidden) == [], case
    finally:
        broken.unlink()
    assert cf.absolute_paths_in(server.get("/history"), forbidden) == []
    assert cf.absolute_paths_in(entry, forbidden) == []
