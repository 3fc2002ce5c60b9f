"""The ComfyUI door of IDDM: thin V3 nodes over the comfyui_iddm engine (no algorithm code here).

Never installed as a top-level package (ComfyUI has its own `nodes` module); the pack's root
__init__.py imports the node modules relatively, one at a time, so one failing module does not
take the others down. spec.py and convert.py import no ComfyUI code, for tests without ComfyUI.
"""

# The node modules (each defines NODES), imported in this order by the pack's __init__.py.
NODE_MODULES = ("photo_nodes", "train_node", "similarity_node", "lora_node", "save_public_image",
                "cloak_node", "apdm_node")
