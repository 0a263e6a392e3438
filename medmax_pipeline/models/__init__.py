"""The models the stages run, in their real on-disk layouts: the VQGAN image tokenizer and its
exact preprocessing, Chameleon in HF format, and the CLIP scorer. They import only core."""
