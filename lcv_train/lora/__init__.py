"""LoRA: adapters on the DiT's linears (``adapters``) and the published LongCat LoRA file (``published``)."""

from lcv_train.lora.adapters import (FUSED_PARTS, LoRAConfig, LoRALinear, add_lora, attach_lora, base_state_dict,
                                     is_lora_name, lora_modules, lora_state_dict, merge_lora, set_lora_multiplier,
                                     unmerge_lora)
from lcv_train.lora.published import (load_published_lora, module_name_of, published_lora_state_dict,
                                      published_module_key, read_published_lora, save_published_lora)

__all__ = ["FUSED_PARTS", "LoRAConfig", "LoRALinear", "add_lora", "attach_lora", "base_state_dict", "is_lora_name",
           "load_published_lora", "lora_modules", "lora_state_dict", "merge_lora", "module_name_of",
           "published_lora_state_dict", "published_module_key", "read_published_lora", "save_published_lora",
           "set_lora_multiplier", "unmerge_lora"]
