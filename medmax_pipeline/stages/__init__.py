"""One module (or small package) per stage of the workflow, in chain order: collect,
tokenize_images, vocab, assemble, train, evaluate. A stage imports core and models, never another
stage; data passes between stages only as artifacts (parquet files, model folders)."""
