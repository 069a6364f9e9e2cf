"""Conan 2 recipe for kvx, a header-only C++20 framework (conan-center header-library template)."""
import os
import re

from conan import ConanFile
from conan.tools.build import check_min_cppstd
from conan.tools.cmake import CMake, CMakeToolchain, cmake_layout
from conan.tools.files import copy, load

required_conan_version = ">=2.0"


class KvxConan(ConanFile):
    name = "kvx"
    description = ("Header-only C++20 framework for KVCache-centric, prefill/decode-disaggregated "
                   "LLM serving: transfer engine, tiered KV cache, store, P/D plumbing")
    license = "Apache-2.0"
    topics = ("llm", "kv-cache", "rdma", "ucx", "asio", "header-only")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    # Optional backends change only requirements and components, never the package id.
    options = {"with_ucx": [True, False], "with_uring": [True, False], "with_redis": [True, False]}
    default_options = {"with_ucx": False, "with_uring": False, "with_redis": False}
    no_copy_source = True

    def export_sources(self):
        root = os.path.join(self.recipe_folder, "..")
        for pattern in ("CMakeLists.txt", "include/*", "cmake/*", "LICENSE"):
            copy(self, pattern, root, self.export_sources_folder)

    def set_version(self):
        if self.version:
            return
        text = load(self, os.path.join(self.recipe_folder, "..", "include", "kvx", "version.hpp"))
        parts = [re.search(rf"#define KVX_VERSION_{p} (\d+)", text).group(1) for p in ("MAJOR", "MINOR", "PATCH")]
        self.version = ".".join(parts)

    def layout(self):
        cmake_layout(self, src_folder=".")

    def requirements(self):
        self.requires("boost/1.81.0", transitive_headers=True)
        self.requires("nlohmann_json/3.11.2", transitive_headers=True)
        self.requires("range-v3/0.12.0", transitive_headers=True)
        self.requires("xxhash/0.8.1", transitive_headers=True)
        if self.options.with_uring:
            self.requires("liburing/2.3", transitive_headers=True)
        if self.options.with_redis:
            self.requires("hiredis/0.14.1", transitive_headers=True)
        if self.options.with_ucx:
            # conan-center has no UCX recipe: provide it with [platform_requires] (see conan/profiles).
            self.requires("openucx/1.13.1", transitive_headers=True)

    def package_id(self):
        self.info.clear()

    def validate(self):
        check_min_cppstd(self, "20")

    def generate(self):
        tc = CMakeToolchain(self)
        tc.cache_variables["KVX_BUILD_TESTS"] = False
        tc.cache_variables["KVX_BUILD_EXAMPLES"] = False
        tc.cache_variables["KVX_BUILD_BENCHMARKS"] = False
        tc.cache_variables["KVX_INSTALL"] = True
        for backend in ("ucx", "uring", "redis"):
            tc.cache_variables[f"KVX_WITH_{backend.upper()}"] = "ON" if self.options.get_safe(f"with_{backend}") else "OFF"
        tc.cache_variables["KVX_WITH_VERBS"] = "OFF"
        tc.cache_variables["KVX_WITH_CUDA"] = "OFF"
        tc.generate()

    def build(self):
        pass  # header-only: nothing to compile

    def package(self):
        copy(self, "LICENSE", self.source_folder, os.path.join(self.package_folder, "licenses"))
        cmake = CMake(self)
        cmake.configure()
        cmake.install()

    def package_info(self):
        # kvx installs its own CMake package (kvxConfig.cmake with components and
        # the same dependency finder its build uses); consumers get it through
        # builddirs rather than a generated config.
        self.cpp_info.set_property("cmake_find_mode", "none")
        self.cpp_info.builddirs = [os.path.join("share", "cmake", "kvx")]
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
