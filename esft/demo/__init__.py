"""The demo around the method, kept apart from it: the generated task corpora (`synthetic`, behind
`esft data`), the recipe that pretrains the embedded mini-moe (`pretrain`, behind `esft pretrain`),
the embedded model itself (`assets/mini-moe`, the default of `esft run`), and the one-process
quickstart (`quickstart`, behind `esft quickstart`). The method (`esft` outside this package)
never imports it; only the tests' tiny models (`esft.testing`) reuse its tokenizer.
"""
