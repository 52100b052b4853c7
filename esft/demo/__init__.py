"""The demo around the method, kept apart from it: the generated task corpora (`synthetic`, behind
`esft data`), the recipe that pretrains the embedded mini-moe (`pretrain`, behind `esft pretrain`),
the embedded model itself (`assets/mini-moe`, the default of `esft run`), and the one-process
quickstart (`quickstart`, behind `esft quickstart`). Nothing in `esft` outside this package imports it.
"""
