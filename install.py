"""Run by ComfyUI-Manager after requirements.txt: installs what must not resolve its dependencies.

facenet-pytorch (the MTCNN face detector; its weights ship in the wheel) declares torch<2.3, which
would downgrade ComfyUI's torch, so it is installed with --no-deps. Uses ComfyUI's own Python
(sys.executable), which also works for the Windows portable build.
"""
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("facenet_pytorch") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", "facenet-pytorch>=2.5"])
