# Helpers for kvx's own tests, examples and benchmarks.
include_guard(GLOBAL)

set(kvx_backends ucx verbs cuda redis uring)

# kvx_backend_of(<path> <out-var>): the backend a header or source needs, from
# its name (kvx/transport/ucx.hpp, tests/transport/ucx/..., cuda_ipc.hpp).
function(kvx_backend_of path out)
  set(${out} "" PARENT_SCOPE)
  foreach(b ${kvx_backends})
    if(path MATCHES "/${b}[^/]*$" OR path MATCHES "/${b}/")
      set(${out} ${b} PARENT_SCOPE)
      return()
    endif()
  endforeach()
endfunction()

# kvx_link_for(<target> <backend>): links kvx, or kvx::<backend> when given.
function(kvx_link_for target backend)
  if(backend)
    target_link_libraries(${target} PRIVATE kvx::${backend} kvx_warnings)
  else()
    target_link_libraries(${target} PRIVATE kvx::kvx kvx_warnings)
  endif()
endfunction()
