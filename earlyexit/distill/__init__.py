"""Online self-distillation of exit heads (see OnlineDistiller)."""
