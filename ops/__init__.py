"""The operator's command line: the `processor` entry point and its subcommands (SPEC §7).

It sits above `supervisor/` and `shard/` and may import them; neither imports it, and
`common/` imports none of the three.
"""
