"""The parent process: owns signals, runs migrations, forks and watches the shards."""
