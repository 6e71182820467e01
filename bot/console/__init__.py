"""The console: terminal chat on the same runtime and store (`ducklm console`).

A platform like Slack and Matrix, for the operator at the terminal; it needs no
chat account. `terminal` is the read-eval loop, `format` draws approval cards.
"""
