# Picks CUDA architectures when the caller named none (CMAKE_CUDA_ARCHITECTURES unset): the
# compute capabilities of the GPUs nvidia-smi reports, so a build on a GPU machine runs natively;
# with no GPU to ask, one architecture, which keeps builds on GPU-less machines short. Compute
# capability 9.0 builds as 90a, which adds the Hopper prefill kernel (warpgroup MMA; sm_90a code
# runs on 9.0 devices only). Release wheels name their list explicitly.
function(tinyserve_default_cuda_architectures out_var)
  set(_archs "")
  find_program(_nvidia_smi nvidia-smi)
  if(_nvidia_smi)
    execute_process(COMMAND ${_nvidia_smi} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE _caps RESULT_VARIABLE _rc ERROR_QUIET
                    OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(_rc EQUAL 0 AND _caps)
      string(REPLACE "\n" ";" _caps "${_caps}")
      foreach(_cap IN LISTS _caps)
        string(STRIP "${_cap}" _cap)
        string(REPLACE "." "" _cap "${_cap}")
        if(_cap STREQUAL "90")
          list(APPEND _archs 90a)
        elseif(_cap MATCHES "^[0-9]+$")
          list(APPEND _archs ${_cap})
        endif()
      endforeach()
      list(REMOVE_DUPLICATES _archs)
    endif()
  endif()
  if(NOT _archs)
    set(_archs 90)
  endif()
  set(${out_var} "${_archs}" PARENT_SCOPE)
endfunction()
