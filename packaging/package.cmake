# The Debian package (scripts/package: cmake -DTB_PACKAGE=ON -DCMAKE_INSTALL_PREFIX=/usr, then
# cpack -G DEB): where Debian's Lua 5.4 and systemd look, the docs and maintainer scripts of
# packaging/, dependencies from dpkg-shlibdeps.
if(NOT CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  message(FATAL_ERROR "TB_PACKAGE needs -DCMAKE_INSTALL_PREFIX=/usr (got ${CMAKE_INSTALL_PREFIX})")
endif()

# the changelog's newest entry is the version being packaged
file(STRINGS ${CMAKE_SOURCE_DIR}/packaging/changelog TB_CHANGELOG_TOP LIMIT_COUNT 1)
if(NOT TB_CHANGELOG_TOP MATCHES "^tbagent \\(${PROJECT_VERSION}\\) ")
  message(FATAL_ERROR "packaging/changelog starts with '${TB_CHANGELOG_TOP}': add an entry for ${PROJECT_VERSION}")
endif()

# systemd's own directories for this release (/lib/systemd/system on Debian 12, /usr/lib/...
# on 13), from its pkg-config file when there is one
pkg_get_variable(TB_UNIT_DIR systemd systemdsystemunitdir)
pkg_get_variable(TB_SYSUSERS_DIR systemd sysusersdir)
if(NOT TB_UNIT_DIR)
  set(TB_UNIT_DIR /lib/systemd/system)
endif()
if(NOT TB_SYSUSERS_DIR)
  set(TB_SYSUSERS_DIR /usr/lib/sysusers.d)
endif()

set(TB_DOC share/doc/tbagent)
install(FILES packaging/tbagent@.service DESTINATION ${TB_UNIT_DIR})
install(FILES packaging/tbagent.sysusers DESTINATION ${TB_SYSUSERS_DIR} RENAME tbagent.conf)
install(FILES packaging/copyright README.md DESTINATION ${TB_DOC})
add_custom_command(OUTPUT ${CMAKE_BINARY_DIR}/changelog.gz
  COMMAND gzip -9nc ${CMAKE_SOURCE_DIR}/packaging/changelog > ${CMAKE_BINARY_DIR}/changelog.gz
  DEPENDS ${CMAKE_SOURCE_DIR}/packaging/changelog)
add_custom_target(changelog ALL DEPENDS ${CMAKE_BINARY_DIR}/changelog.gz)
install(FILES ${CMAKE_BINARY_DIR}/changelog.gz DESTINATION ${TB_DOC})
file(GLOB TB_EXAMPLES CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/examples/*.lua)
install(FILES ${TB_EXAMPLES} packaging/firmware-install.conf DESTINATION ${TB_DOC}/examples)
install(FILES spec/examples_spec.lua DESTINATION ${TB_DOC}/examples/spec)
install(DIRECTORY DESTINATION /etc/tbagent)

set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME tbagent)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_FILE_NAME "tbagent_${PROJECT_VERSION}_amd64")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "tbagent maintainers <maintainers@users.noreply.r-seed-45c2e7cb.example>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "ThingsBoard device agent whose behaviour is a Lua script")
set(CPACK_PACKAGE_DESCRIPTION "tbagent connects a device to ThingsBoard over MQTT and runs a Lua 5.4
script that sends telemetry and attributes, answers RPCs, follows shared
attributes and installs firmware updates. Data waits in a durable outbox
while offline; the script reloads without dropping the session.
.
The package holds the agent, the tb library for Busted specs (Lua 5.4),
the systemd unit tbagent@.service and tbagent status.")
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# http.c loads libcurl with dlopen (only when a firmware comes by URL), which dpkg-shlibdeps
# cannot see
set(CPACK_DEBIAN_PACKAGE_DEPENDS "libcurl4t64 | libcurl4")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "lua-busted")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${CMAKE_SOURCE_DIR}/packaging/postinst ${CMAKE_SOURCE_DIR}/packaging/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)
