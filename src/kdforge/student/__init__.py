"""Building students: layers kept from a teacher, LoRA adapters, export."""
