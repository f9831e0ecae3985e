"""The `featuremaps` command line: `local` runs the pipeline in-process; `submit`, `status`,
`download` and `batch` talk to the service over HTTP."""
