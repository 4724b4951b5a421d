# CMake generated Testfile for 
# Source directory: /work/wt/cpu-prefill
# Build directory: /work/wt/cpu-prefill/build-cuda
# 
# This file includes the relevant testing commands required for 
# testing this directory and lists subdirectories to be tested as well.
subdirs("tests/cpp")
