"""The console: terminal chat on the same runtime and store (`ducklm console`).

A platform like Slack and Matrix, for the operator at the terminal; it needs no
chat account. `terminal` is the read-eval loop, `format` draws approval cards,
`output` writes (Markdown styled on a terminal, plain in a pipe), `reader` reads
lines (readline editing and history) and `completion` completes `/duck` words.
"""
