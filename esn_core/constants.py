"""Fixed vocabulary of the method (SPEC §0)."""

# ESD's five emotions, in the order SPEC uses for tie-breaking (CAS argmax ties).
EMOTIONS: tuple[str, ...] = ("neutral", "happy", "angry", "sad", "surprise")

# Conversion always starts from neutral; these are the targets (§4.3).
TARGETS: tuple[str, ...] = ("happy", "angry", "sad", "surprise")

# Folder names in the released ESD tree, in file-id block order (000001-000350 Neutral, ...).
ESD_FOLDERS: tuple[str, ...] = ("Neutral", "Angry", "Happy", "Sad", "Surprise")

SAMPLE_RATE = 16_000
