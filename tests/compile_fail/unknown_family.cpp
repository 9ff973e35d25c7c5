// family(name) is checked at compile time: a name FamilyList does not have does not compile.
#include <hypermoe/io/families.hpp>

constexpr hypermoe::Family llama = hypermoe::family("llama");
