"""Token ids and sizes of the Chameleon / Anole / MedMax vocabulary (see MEDMAX-FACTS.md)."""

VOCAB_SIZE = 65536
BOS_ID = 0
PAD_ID = 1
EOS_ID = 2
IMAGE_CODE_OFFSET = 4  # vocab id = VQGAN code + 4
NUM_IMAGE_CODES = 8192
FIRST_IMAGE_TOKEN_ID = IMAGE_CODE_OFFSET  # 4
LAST_IMAGE_TOKEN_ID = IMAGE_CODE_OFFSET + NUM_IMAGE_CODES - 1  # 8195
END_IMAGE_ID = 8196  # <eoss>
BEGIN_IMAGE_ID = 8197  # <racm3:break>
SEPARATOR_ID = 8710  # <reserved08706>: end of turn / prompt-response separator
IMAGE_PLACEHOLDER_ID = 8711  # <image> in text_tokenizer_modified.json

BOS_TOKEN = "<s>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
END_IMAGE_TOKEN = "<eoss>"
BEGIN_IMAGE_TOKEN = "<racm3:break>"
SEPARATOR_TOKEN = "<reserved08706>"
IMAGE_PLACEHOLDER_TOKEN = "<image>"

IMAGE_SIZE = 512
CODES_PER_SIDE = 32
CODES_PER_IMAGE = CODES_PER_SIDE * CODES_PER_SIDE  # 1024
IMAGE_BLOCK_LEN = CODES_PER_IMAGE + 2  # 1026: begin, codes, end

IGNORE_INDEX = -100
DEFAULT_MAX_LENGTH = 2048

# The VQGAN files of a checkpoint's tokenizer folder (taming's config and weights).
VQGAN_YAML = "vqgan.yaml"
VQGAN_CKPT = "vqgan.ckpt"
