"""Training: data shards, tokenizer training, the two-stage pretraining recipe, SFT and DPO.

Each entry point is a subcommand of the ``bitnet158`` CLI (``bitnet158 data``, ``bitnet158 tokenizer``,
``bitnet158 pretrain``, ``bitnet158 sft``, ``bitnet158 dpo``, ``bitnet158 export``).
"""
