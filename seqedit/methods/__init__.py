"""The editing math, pure torch: methods (ROME, ...) and their shared ops.

Shared ops: `arch` (module names per architecture), `hooks` (capture/edit module I/O),
`tokens` (subject token positions), `context` (context templates), `keys_values` (keys
at the subject), `value_search` (ROME's v*, MEMIT's z), `updates` (typed updates and edit
results).
Evaluation: `scoring` (teacher-forced target scores, batched), `metrics` (every metric's
definition), `locality` (probe drift, perplexity), `generation` (batched sampling) and
`fluency` (n-gram entropy).
"""
