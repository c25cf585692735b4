"""LoRA and its key tables: adapters the memory manager places, exact removal."""
