#!/usr/bin/env bash
# nvcc through ccache, for torch's ninja build (bench/gpu_rehearsal.sh sets PYTORCH_NVCC to this).
# ccache (4.7) does not cache nvcc calls that use the long dependency options torch's ninja rule
# passes (--generate-dependencies-with-compile --dependency-output F: "multiple source files");
# their short forms, -MD -MF F, it caches. FASTFORMER_REAL_NVCC: the toolkit's nvcc.
args=()
for a in "$@"; do
  case "$a" in
    --generate-dependencies-with-compile) args+=(-MD) ;;
    --dependency-output) args+=(-MF) ;;
    *) args+=("$a") ;;
  esac
done
exec ccache "${FASTFORMER_REAL_NVCC:?set FASTFORMER_REAL_NVCC to the CUDA toolkit nvcc}" "${args[@]}"
