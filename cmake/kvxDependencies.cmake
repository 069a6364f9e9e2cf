# Finds kvx's dependencies and wraps them in kvx_deps:: targets. The same file
# is installed and included by kvxConfig.cmake, so a consumer's find_package
# resolves dependencies exactly as kvx's own build does.
#
#   core: Boost (Asio, Beast; headers only), nlohmann_json, range-v3, xxHash, Threads
#   optional, each KVX_WITH_<X> = AUTO | ON | OFF:
#     UCX (ucx::ucp), VERBS (libibverbs), CUDA (CUDAToolkit), REDIS (hiredis), URING (liburing)
include_guard(GLOBAL)
include(CMakeFindDependencyMacro)

if(NOT TARGET kvx_deps::core)
  find_package(Threads REQUIRED)
  find_package(Boost 1.81 REQUIRED CONFIG)
  find_package(nlohmann_json 3.11 REQUIRED CONFIG)
  find_package(range-v3 REQUIRED CONFIG)
  find_path(KVX_XXHASH_INCLUDE_DIR xxhash.h)
  if(NOT KVX_XXHASH_INCLUDE_DIR)
    message(FATAL_ERROR "kvx: xxhash.h not found (Debian: apt-get install libxxhash-dev)")
  endif()
  add_library(kvx_deps::core INTERFACE IMPORTED)
  # xxHash is used inline (XXH_INLINE_ALL): header only, no library to link.
  target_include_directories(kvx_deps::core INTERFACE ${KVX_XXHASH_INCLUDE_DIR})
  target_link_libraries(kvx_deps::core INTERFACE Boost::headers nlohmann_json::nlohmann_json range-v3::range-v3
                                                 Threads::Threads)
endif()

set(KVX_WITH_UCX AUTO CACHE STRING "UCX transport (AUTO, ON, OFF)")
set(KVX_WITH_VERBS AUTO CACHE STRING "ibverbs transport (AUTO, ON, OFF)")
set(KVX_WITH_CUDA AUTO CACHE STRING "CUDA memory, cuda_ipc transport and kernels (AUTO, ON, OFF)")
set(KVX_WITH_REDIS AUTO CACHE STRING "Redis metadata backend (AUTO, ON, OFF)")
set(KVX_WITH_URING AUTO CACHE STRING "io_uring file tier (AUTO, ON, OFF)")

# kvx_backend(<name> <found-var> <debian package>): ON without the library is
# an error that says what to install; AUTO quietly goes without it.
function(kvx_backend name found package)
  string(TOUPPER ${name} NAME)
  if(KVX_WITH_${NAME} STREQUAL "ON" AND NOT ${found})
    message(FATAL_ERROR "kvx: KVX_WITH_${NAME}=ON but the ${name} library was not found "
                        "(Debian: apt-get install ${package}); set KVX_WITH_${NAME}=AUTO or OFF to build without it")
  endif()
endfunction()

find_package(PkgConfig QUIET)

if(NOT KVX_WITH_UCX STREQUAL "OFF" AND NOT TARGET kvx_deps::ucx)
  find_package(ucx QUIET CONFIG)
  if(TARGET ucx::ucp)
    add_library(kvx_deps::ucx INTERFACE IMPORTED)
    target_link_libraries(kvx_deps::ucx INTERFACE ucx::ucp ucx::uct ucx::ucs)
  endif()
  kvx_backend(ucx "${ucx_FOUND}" libucx-dev)
endif()

foreach(pc verbs:libibverbs:libibverbs-dev redis:hiredis:libhiredis-dev uring:liburing:liburing-dev)
  string(REPLACE ":" ";" pc "${pc}")
  list(GET pc 0 name)
  list(GET pc 1 module)
  list(GET pc 2 package)
  string(TOUPPER ${name} NAME)
  if(NOT KVX_WITH_${NAME} STREQUAL "OFF" AND NOT TARGET kvx_deps::${name})
    set(kvx_found_${name} FALSE)
    if(PkgConfig_FOUND)
      pkg_check_modules(KVX_PC_${NAME} QUIET IMPORTED_TARGET GLOBAL ${module})
      if(KVX_PC_${NAME}_FOUND)
        add_library(kvx_deps::${name} INTERFACE IMPORTED)
        target_link_libraries(kvx_deps::${name} INTERFACE PkgConfig::KVX_PC_${NAME})
        set(kvx_found_${name} TRUE)
      endif()
    endif()
    kvx_backend(${name} ${kvx_found_${name}} ${package})
  endif()
endforeach()

if(NOT KVX_WITH_CUDA STREQUAL "OFF" AND NOT TARGET kvx_deps::cuda)
  find_package(CUDAToolkit QUIET)
  if(CUDAToolkit_FOUND)
    add_library(kvx_deps::cuda INTERFACE IMPORTED)
    target_link_libraries(kvx_deps::cuda INTERFACE CUDA::cudart)
  endif()
  kvx_backend(cuda "${CUDAToolkit_FOUND}" nvidia-cuda-toolkit)
endif()
