"""Drop-in use of fastkd's fused losses inside other trainers: TRL (:mod:`.trl`) and the Hugging
Face ``Trainer`` (:mod:`.hf_trainer`). Each module imports its host library only when used."""
