"""The `fastcluster` command: main (the parser), run, options, app loading,
status. The console script is fastcluster.cli.main:main."""
