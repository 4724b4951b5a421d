# CMake generated Testfile for 
# Source directory: /work/wt/cpu-prefill/tests/cpp
# Build directory: /work/wt/cpu-prefill/build-cuda/tests/cpp
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
add_test([=[test_tensor_ops]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_tensor_ops")
set_tests_properties([=[test_tensor_ops]=] PROPERTIES  _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;22;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
add_test([=[test_block_manager]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_block_manager")
set_tests_properties([=[test_block_manager]=] PROPERTIES  _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;22;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
add_test([=[test_cache_pool]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_cache_pool")
set_tests_properties([=[test_cache_pool]=] PROPERTIES  _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;22;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
add_test([=[test_cuda_ops]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_cuda_ops")
set_tests_properties([=[test_cuda_ops]=] PROPERTIES  SKIP_RETURN_CODE "77" _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;33;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
add_test([=[test_internals]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_internals")
set_tests_properties([=[test_internals]=] PROPERTIES  _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;43;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
add_test([=[test_cuda_kernels]=] "/work/wt/cpu-prefill/build-cuda/tests/cpp/test_cuda_kernels")
set_tests_properties([=[test_cuda_kernels]=] PROPERTIES  SKIP_RETURN_CODE "77" _BACKTRACE_TRIPLES "/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;49;add_test;/work/wt/cpu-prefill/tests/cpp/CMakeLists.txt;0;")
