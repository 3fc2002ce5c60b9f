"""comfyui-iddm engine: identity-decoupled personalization of diffusion models (IDDM).

Pure PyTorch; never imports ComfyUI. The ComfyUI door lives in the pack's nodes/ folder.
"""
__version__ = "0.1.0"
