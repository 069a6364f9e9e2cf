# Installs kvx (find_package mode) and builds and runs the consumer project.
file(REMOVE_RECURSE ${WORK_DIR})
function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}")
  endif()
endfunction()
set(consumer_args -S ${KVX_SOURCE_DIR}/tests/package/consumer -B ${WORK_DIR}/consumer -DCMAKE_CXX_COMPILER=${CXX}
                  -DCMAKE_BUILD_TYPE=Release)
if(MODE STREQUAL "find_package")
  # Install from kvx's own build tree into a private prefix.
  run(${CMAKE_COMMAND} --install ${KVX_BINARY_DIR} --prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} ${consumer_args} -DKVX_CONSUME=find_package -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
      "-DKVX_COMPONENTS=${COMPONENTS}")
else()
  run(${CMAKE_COMMAND} ${consumer_args} -DKVX_CONSUME=add_subdirectory -DKVX_DIR=${KVX_SOURCE_DIR})
endif()
run(${CMAKE_COMMAND} --build ${WORK_DIR}/consumer)
run(${WORK_DIR}/consumer/kvx_consumer)
message(STATUS "consumer (${MODE}) built and ran")
