"""A custom-node pack used only by the real-server tests (linked into custom_nodes while they run).

IDDM Test Attention Probe returns a clone of its MODEL with an attn1 patch (ModelPatcher.
set_model_attn1_patch, as attention-patching packs do) that leaves attention unchanged and logs one
line per call: what ComfyUI put in its extra_options and whether autograd is recording. A test reads
the lines from the server log to see that IDDM Train's forward passes run the MODEL's patches.
"""
import logging

import torch

MARK = "[iddm-probe]"


class AttentionProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = "testing"

    def patch(self, model):
        def probe(q, k, v, extra_options):
            sigmas = extra_options.get("sigmas")
            logging.info(f"{MARK} attn1 sigmas={list(sigmas.shape) if sigmas is not None else None} "
                         f"cond_or_uncond={extra_options.get('cond_or_uncond')} "
                         f"sample_sigmas={'sample_sigmas' in extra_options} grad={torch.is_grad_enabled()}")
            return q, k, v

        patched = model.clone()
        patched.set_model_attn1_patch(probe)
        return (patched,)


NODE_CLASS_MAPPINGS = {"IDDMTestAttentionProbe": AttentionProbe}
