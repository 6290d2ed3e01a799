"""Drop-in equivalents of other libraries' distillation losses, computed by fastkd's ops."""
